// The full-size part of LoRDO's low-rank step on CPU, for float32 matrices (lordo/optim.py calls it per bucket
// of same-shape matrices): Q^T G with the norm of G, the Adam moments of the r x q result, then
// W <- decay W - lr Q N (+ qh G) and R += G; and the other gradients' norms. Each reads the matrices from memory
// once, the rank-r products computed in registers beside that pass (a BLAS product reads its operands apart
// from the step's element-wise passes; the eager path makes one pass per operation). Built on first use by
// lordo/kernels.py.
//
// Rounding, fixed by the definition rather than by the tiling: each entry of a product is a sum over i (rows of
// G, columns of G, or the rank) in ascending order with one fused multiply-add per term; a norm or a sum over a
// matrix is 64 partial sums in a fixed order (`SumSq`); W's update is three FMAs, W decay, then -lr (Q N), then
// qh G. So the results are the same at any thread count and with AVX-512, AVX2 or plain C++ (`set_isa`;
// tests/test_kernels.py compares them), and differ from the eager path's (BLAS products) in the last bits.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

namespace {

// Vectors of L floats, L the instruction set's register width: 16 (AVX-512), 8 (AVX2), 4 (SSE2, NEON). A vector
// type wider than the target's registers has no machine mode there, so the compiler keeps every value of it on the
// stack (a 16-float type in the AVX2 build spent more instructions on stack moves than on FMAs: 10-30x slower).
template <int L>
struct Lanes {
  typedef float vec __attribute__((vector_size(4 * L)));
};
#define LORDO_INLINE inline __attribute__((always_inline))

template <class V>
LORDO_INLINE V load(const float* p) {
  V v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
template <class V>
LORDO_INLINE void store(float* p, V v) { std::memcpy(p, &v, sizeof v); }
// a * b + c rounded once per lane, a a vector or a scalar (written as scalar times vector: compilers broadcast
// it from memory into the FMA). Built with -ffp-contract=fast, and every product in these kernels written as one
// of these, so the compiler fuses each and nothing else into an FMA instruction (the tests compare this with the
// per-lane fmaf below, which the plain build uses: a CPU without FMA instructions has no fused form).
template <bool Contract, class A, class V>
LORDO_INLINE V fmadd(A a, V b, V c) {
  if constexpr (Contract) {
    return a * b + c;
  } else {
    V out;
#pragma GCC unroll 16
    for (int l = 0; l < int(sizeof(V) / 4); ++l) {
      if constexpr (std::is_same_v<A, float>)
        out[l] = __builtin_fmaf(a, b[l], c[l]);
      else
        out[l] = __builtin_fmaf(a[l], b[l], c[l]);
    }
    return out;
  }
}

// Register tiles, in vectors of `lanes` floats: sizes change the speed, never the result.
struct Wide : Lanes<16> {   // 32 registers of 16 floats (AVX-512)
  static constexpr bool contract = true;
  static constexpr int lanes = 16;
  static constexpr int rows_k = 12, rows_vecs = 2, rows_block = 32;   // project over rows: k x vecs accumulators
  static constexpr int cols_vecs = 6;                                  // project over columns: rank per pass / lanes
  static constexpr int cols_rows(int vecs) { return vecs == 1 ? 16 : 24 / vecs; }
  static constexpr int apply_rows = 4, apply_vecs = 4, apply_chunk = 16;   // update: rows x vecs accumulators
};
struct Narrow : Lanes<8> {   // 16 registers of 8 floats (AVX2)
  static constexpr bool contract = true;
  static constexpr int lanes = 8;
  static constexpr int rows_k = 6, rows_vecs = 2, rows_block = 32;
  static constexpr int cols_vecs = 4;
  static constexpr int cols_rows(int vecs) { return vecs == 1 ? 8 : 12 / vecs; }
  static constexpr int apply_rows = 6, apply_vecs = 2, apply_chunk = 24;
};
// Any CPU (16 registers of 4 floats: SSE2, NEON), FMA per lane from the C library's fmaf where the build targets
// no FMA instruction: a call per lane, so this build is slower than the eager path there (optim.py times both).
struct Plain : Lanes<4> {
  static constexpr bool contract = false;
  static constexpr int lanes = 4;
  static constexpr int rows_k = 6, rows_vecs = 2, rows_block = 32;
  static constexpr int cols_vecs = 2;
  static constexpr int cols_rows(int vecs) { return vecs == 1 ? 4 : 2; }
  static constexpr int apply_rows = 2, apply_vecs = 2, apply_chunk = 16;
};

// One step of a register tile: acc[a][v] += x[a * stride] * b[lanes v ...], the scalars broadcast, b's vectors
// loaded once. Every product below is a sequence of these steps, in ascending order of the summed index.
template <class T, int RB, int V>
LORDO_INLINE void tile_step(typename T::vec (&acc)[RB][V], const float* x, int64_t stride, const float* b) {
  typename T::vec bv[V];
#pragma GCC unroll 32
  for (int v = 0; v < V; ++v) bv[v] = load<typename T::vec>(b + T::lanes * v);
#pragma GCC unroll 32
  for (int a = 0; a < RB; ++a)
    for (int v = 0; v < V; ++v) acc[a][v] = fmadd<T::contract>(x[a * stride], bv[v], acc[a][v]);
}

// 64 partial sums (lane l of vector v holds sum number lanes v + l) and a scalar one, added in a fixed order, the
// same for every vector width: sums s and s + 16, s + 32 and s + 48 in pairs, the pairs' sums, then s = 0..15 in
// order, then the tail.
template <class T>
LORDO_INLINE float total(const typename T::vec (&sums)[64 / T::lanes], float tail) {
  constexpr int per16 = 16 / T::lanes;
  typename T::vec quarter[per16];
#pragma GCC unroll 16
  for (int h = 0; h < per16; ++h)
    quarter[h] = (sums[h] + sums[per16 + h]) + (sums[2 * per16 + h] + sums[3 * per16 + h]);
  float s = 0.f;
#pragma GCC unroll 16
  for (int h = 0; h < per16; ++h)
#pragma GCC unroll 16
    for (int l = 0; l < T::lanes; ++l) s += quarter[h][l];
  return s + tail;
}

// Sum of squares of rows in order: 64 partial sums over each row's 64-column groups (independent chains), the rest
// of its 16-column groups in the first 16, 32 or 48 of them, the rest of the row in one sum; then `total`.
template <class T>
struct SumSq {
  static constexpr int vecs = 64 / T::lanes, per16 = 16 / T::lanes;
  typename T::vec lanes[vecs] = {};
  float tail = 0.f;
  LORDO_INLINE void rows(const float* x, int64_t rows, int64_t cols) {
    using vec = typename T::vec;
    const int64_t c64 = cols / 64 * 64, c16 = cols / 16 * 16;
    vec a[vecs];
#pragma GCC unroll 16
    for (int v = 0; v < vecs; ++v) a[v] = lanes[v];
    float t = tail;
    for (int64_t i = 0; i < rows; ++i, x += cols) {
      for (int64_t c = 0; c < c64; c += 64)
#pragma GCC unroll 16
        for (int v = 0; v < vecs; ++v) {
          const vec y = load<vec>(x + c + T::lanes * v);
          a[v] = fmadd<T::contract>(y, y, a[v]);
        }
      for (int64_t c = c64; c < c16; c += 16)
#pragma GCC unroll 16
        for (int h = 0; h < per16; ++h) {
          const vec y = load<vec>(x + c + T::lanes * h);
          vec& s = a[(c - c64) / 16 * per16 + h];
          s = fmadd<T::contract>(y, y, s);
        }
      for (int64_t c = c16; c < cols; ++c) t = __builtin_fmaf(x[c], x[c], t);
    }
#pragma GCC unroll 16
    for (int v = 0; v < vecs; ++v) lanes[v] = a[v];
    tail = t;
  }
  float value() const { return total<T>(lanes, tail); }
};

// ---- out (r x q) = Q^T G for G stored p x q, Q p x r: out accumulates block by block of G's rows (it stays in
// cache), each entry over i in order.
template <class T, int K, int V, bool First>
LORDO_INLINE void project_rows_tile(float* out, const float* Q, const float* G, int64_t i0, int64_t i1, int64_t q,
                                    int64_t r, int64_t c, int64_t k0) {
  using vec = typename T::vec;
  vec acc[K][V];
#pragma GCC unroll 32
  for (int k = 0; k < K; ++k)
    for (int v = 0; v < V; ++v) acc[k][v] = First ? vec{} : load<vec>(out + (k0 + k) * q + c + T::lanes * v);
  for (int64_t i = i0; i < i1; ++i) tile_step<T, K, V>(acc, Q + i * r + k0, 1, G + i * q + c);
#pragma GCC unroll 32
  for (int k = 0; k < K; ++k)
    for (int v = 0; v < V; ++v) store(out + (k0 + k) * q + c + T::lanes * v, acc[k][v]);
}

// The tile for the k-chunk [k0, k0 + kb), kb <= K (the last chunk of a rank that K does not divide).
template <class T, int K, int V, bool First>
LORDO_INLINE void project_rows_chunk(int64_t kb, float* out, const float* Q, const float* G, int64_t i0, int64_t i1,
                                     int64_t q, int64_t r, int64_t c, int64_t k0) {
  if constexpr (K > 0) {
    if (kb == K) return project_rows_tile<T, K, V, First>(out, Q, G, i0, i1, q, r, c, k0);
    project_rows_chunk<T, K - 1, V, First>(kb, out, Q, G, i0, i1, q, r, c, k0);
  }
}

template <class T, int V>
LORDO_INLINE void project_rows_columns(float* out, const float* Q, const float* G, int64_t i0, int64_t i1, int64_t q,
                                       int64_t r, int64_t c) {
  constexpr int K = T::rows_k;
  for (int64_t i = i0; i < i1; ++i)   // this block's rows two tiles ahead, for the next tiles
#pragma GCC unroll 32
    for (int v = 0; v < V; ++v) __builtin_prefetch(G + i * q + c + T::lanes * (2 * V + v), 0, 3);
  for (int64_t k0 = 0; k0 < r; k0 += K) {
    const int64_t kb = std::min<int64_t>(K, r - k0);
    if (i0 == 0)
      project_rows_chunk<T, K, V, true>(kb, out, Q, G, i0, i1, q, r, c, k0);
    else
      project_rows_chunk<T, K, V, false>(kb, out, Q, G, i0, i1, q, r, c, k0);
  }
}

template <class T>
LORDO_INLINE float project_rows(float* out, const float* Q, const float* G, int64_t p, int64_t q, int64_t r) {
  constexpr int V = T::rows_vecs, L = T::lanes;
  const int64_t q_tiles = q / (L * V) * (L * V), q_vecs = q / L * L;
  SumSq<T> norm;
  for (int64_t i0 = 0; i0 < p; i0 += T::rows_block) {
    const int64_t i1 = std::min(p, i0 + T::rows_block);
    for (int64_t c = 0; c < q_tiles; c += L * V) project_rows_columns<T, V>(out, Q, G, i0, i1, q, r, c);
    for (int64_t c = q_tiles; c < q_vecs; c += L) project_rows_columns<T, 1>(out, Q, G, i0, i1, q, r, c);
    for (int64_t c = q_vecs; c < q; ++c)
      for (int64_t i = i0; i < i1; ++i)
        for (int64_t k = 0; k < r; ++k) {
          float& o = out[k * q + c];
          o = __builtin_fmaf(Q[i * r + k], G[i * q + c], i ? o : 0.f);
        }
    norm.rows(G + i0 * q, i1 - i0, q);
  }
  return norm.value();
}

// ---- outT (m x r) = G Q for G stored m x n, Q n x r (given as Qp, n x ldq, zero-padded to whole vectors): rows of
// G are independent, each entry sums over c in order.
template <class T, int RB, int RV>
LORDO_INLINE void project_cols_tile(float* outT, const float* Qp, int64_t ldq, const float* G, int64_t n, int64_t r,
                                    int64_t j0, int64_t k0, int64_t kn) {
  using vec = typename T::vec;
  constexpr int L = T::lanes;
  vec acc[RB][RV];
#pragma GCC unroll 32
  for (int a = 0; a < RB; ++a)
    for (int v = 0; v < RV; ++v) acc[a][v] = vec{};
  for (int64_t c = 0; c < n; ++c) {
    if ((c & 15) == 0)   // each row four lines ahead
#pragma GCC unroll 32
      for (int a = 0; a < RB; ++a) __builtin_prefetch(G + (j0 + a) * n + c + 64, 0, 3);
    tile_step<T, RB, RV>(acc, G + j0 * n + c, n, Qp + c * ldq + k0);
  }
#pragma GCC unroll 32
  for (int a = 0; a < RB; ++a) {
    float* o = outT + (j0 + a) * r + k0;
    int v = 0;
    for (; L * v + L <= kn; ++v) store(o + L * v, acc[a][v]);
    for (int64_t k = L * v; k < kn; ++k) o[k] = acc[a][v][k - L * v];
  }
}

template <class T, int RV>
LORDO_INLINE void project_cols_block(float* outT, const float* Qp, int64_t ldq, const float* G, int64_t n, int64_t r,
                                     int64_t j0, int64_t rows, int64_t k0, int64_t kn) {
  constexpr int RB = T::cols_rows(RV);
  if (rows == RB)
    project_cols_tile<T, RB, RV>(outT, Qp, ldq, G, n, r, j0, k0, kn);
  else
    for (int64_t j = j0; j < j0 + rows; ++j) project_cols_tile<T, 1, RV>(outT, Qp, ldq, G, n, r, j, k0, kn);
}

template <class T, int RV>
LORDO_INLINE void project_cols_vecs(int64_t vecs, float* outT, const float* Qp, int64_t ldq, const float* G, int64_t n,
                                    int64_t r, int64_t j0, int64_t rows, int64_t k0, int64_t kn) {
  if constexpr (RV > 0) {
    if (vecs == RV) return project_cols_block<T, RV>(outT, Qp, ldq, G, n, r, j0, rows, k0, kn);
    project_cols_vecs<T, RV - 1>(vecs, outT, Qp, ldq, G, n, r, j0, rows, k0, kn);
  }
}

template <class T>
LORDO_INLINE float project_cols(float* outT, const float* Qp, int64_t ldq, const float* G, int64_t m, int64_t n,
                                int64_t r) {
  constexpr int most = T::cols_vecs, L = T::lanes;
  SumSq<T> norm;
  // rows a block: the widest pass's tile (a narrower last pass of a large rank takes them one by one)
  const int64_t block = T::cols_rows(std::min<int64_t>(most, ldq / L));
  for (int64_t j0 = 0; j0 < m; j0 += block) {
    const int64_t rows = std::min(block, m - j0);
    for (int64_t k0 = 0; k0 < r; k0 += L * most) {
      const int64_t kn = std::min<int64_t>(L * most, r - k0);
      project_cols_vecs<T, most>((kn + L - 1) / L, outT, Qp, ldq, G, n, r, j0, rows, k0, kn);
    }
    norm.rows(G + j0 * n, rows, n);
  }
  return norm.value();
}

// ---- W (rows x C) <- decay W - lr A B (+ qh G), R += G, for W's rows [i0, i1): A rows x r, B r x C. Each entry of
// A B sums over k in order; then W decay, plus -lr times it, plus qh G, each rounded once.
template <class T, int RB, int V>
LORDO_INLINE void apply_tile(float* W, const float* G, float* R, const float* A, const float* B, int64_t C, int64_t r,
                             int64_t i0, int64_t i1, int64_t c, float neg_lr, float decay, float qh, bool has_qh) {
  using vec = typename T::vec;
  constexpr int L = T::lanes;
  vec acc[RB][V];
#pragma GCC unroll 32
  for (int a = 0; a < RB; ++a)
    for (int v = 0; v < V; ++v) acc[a][v] = vec{};
  if (i0 + 2 * RB <= i1)   // the next block of rows, same columns, into L2
#pragma GCC unroll 32
    for (int a = 0; a < RB; ++a)
      for (int v = 0; v < V; ++v) {
        const int64_t o = (i0 + RB + a) * C + c + L * v;
        __builtin_prefetch(W + o, 1, 2);
        __builtin_prefetch(G + o, 0, 2);
        if (R) __builtin_prefetch(R + o, 1, 2);
      }
  for (int64_t k = 0; k < r; ++k) tile_step<T, RB, V>(acc, A + i0 * r + k, r, B + k * C + c);
#pragma GCC unroll 32
  for (int a = 0; a < RB; ++a)
    for (int v = 0; v < V; ++v) {
      const int64_t o = (i0 + a) * C + c + L * v;
      const vec g = load<vec>(G + o);
      vec w = fmadd<T::contract>(decay, load<vec>(W + o), vec{});
      w = fmadd<T::contract>(neg_lr, acc[a][v], w);
      if (has_qh) w = fmadd<T::contract>(qh, g, w);
      store(W + o, w);
      if (R) store(R + o, load<vec>(R + o) + g);
    }
}

template <class T>
LORDO_INLINE void apply_rows(float* W, const float* G, float* R, const float* A, const float* B, int64_t C, int64_t r,
                             int64_t i0, int64_t i1, float neg_lr, float decay, float qh, bool has_qh) {
  constexpr int RB = T::apply_rows, V = T::apply_vecs, L = T::lanes;
  const int64_t c_tiles = C / (L * V) * (L * V), c_vecs = C / L * L;
  // a chunk of rows at a time, column tile by column tile: the tile's columns of B stay in L1 down the chunk
  for (int64_t lo = i0; lo < i1; lo += T::apply_chunk) {
    const int64_t hi = std::min(i1, lo + T::apply_chunk), blocks_end = lo + (hi - lo) / RB * RB;
    for (int64_t c = 0; c < c_vecs; c += c < c_tiles ? L * V : L) {
      for (int64_t i = lo; i < blocks_end; i += RB) {
        if (c < c_tiles)
          apply_tile<T, RB, V>(W, G, R, A, B, C, r, i, hi, c, neg_lr, decay, qh, has_qh);
        else
          apply_tile<T, RB, 1>(W, G, R, A, B, C, r, i, hi, c, neg_lr, decay, qh, has_qh);
      }
      for (int64_t i = blocks_end; i < hi; ++i) {
        if (c < c_tiles)
          apply_tile<T, 1, V>(W, G, R, A, B, C, r, i, hi, c, neg_lr, decay, qh, has_qh);
        else
          apply_tile<T, 1, 1>(W, G, R, A, B, C, r, i, hi, c, neg_lr, decay, qh, has_qh);
      }
    }
    for (int64_t i = lo; i < hi; ++i)
      for (int64_t c = c_vecs; c < C; ++c) {
        float s = 0.f;
        for (int64_t k = 0; k < r; ++k) s = __builtin_fmaf(A[i * r + k], B[k * C + c], s);
        const int64_t o = i * C + c;
        float w = __builtin_fmaf(s, neg_lr, __builtin_fmaf(W[o], decay, 0.f));
        if (has_qh) w = __builtin_fmaf(G[o], qh, w);
        W[o] = w;
        if (R) R[o] += G[o];
      }
  }
}

// ---- the Adam moments of one matrix's r x q low-rank gradient g, in place, in one pass: u <- u + (1 - b1)(g - u),
// v <- b2 v + (1 - b2) g g, D = sqrt(v / bc2) + eps, g's storage <- scale u / D. sums[0] = sum(D),
// sums[1] = sum((u / D)^2), each in 64 partial sums added by `total`.
template <class T>
LORDO_INLINE void moments(float* u, float* v, float* g, int64_t n, float b1, float b2, float bc2, float eps,
                          float scale, float* sums) {
  using vec = typename T::vec;
  constexpr bool C = T::contract;
  constexpr int L = T::lanes, vecs = 64 / L;
  const float w1 = 1.f - b1, w2 = 1.f - b2;
  const int64_t n64 = n / 64 * 64;
  vec d_sum[vecs] = {}, n_sum[vecs] = {};
  for (int64_t i = 0; i < n64; i += 64)
#pragma GCC unroll 16
    for (int k = 0; k < vecs; ++k) {
      const int64_t o = i + L * k;
      const vec gk = load<vec>(g + o), uk = load<vec>(u + o);
      const vec un = fmadd<C>(w1, gk - uk, uk);
      const vec vn = fmadd<C>(w2, fmadd<C>(gk, gk, vec{}), fmadd<C>(b2, load<vec>(v + o), vec{}));
      const vec vb = vn / bc2;
      vec d;
#pragma GCC unroll 16
      for (int l = 0; l < L; ++l) d[l] = __builtin_sqrtf(vb[l]);
      d = d + eps;
      const vec nk = un / d;
      store(u + o, un);
      store(v + o, vn);
      store(g + o, fmadd<C>(scale, nk, vec{}));
      d_sum[k] = d_sum[k] + d;
      n_sum[k] = fmadd<C>(nk, nk, n_sum[k]);
    }
  float d_tail = 0.f, n_tail = 0.f;
  for (int64_t i = n64; i < n; ++i) {
    const float un = __builtin_fmaf(w1, g[i] - u[i], u[i]);
    const float vn = __builtin_fmaf(w2, __builtin_fmaf(g[i], g[i], 0.f), __builtin_fmaf(b2, v[i], 0.f));
    const float d = __builtin_sqrtf(vn / bc2) + eps, nk = un / d;
    u[i] = un;
    v[i] = vn;
    g[i] = __builtin_fmaf(scale, nk, 0.f);
    d_tail += d;
    n_tail = __builtin_fmaf(nk, nk, n_tail);
  }
  sums[0] = total<T>(d_sum, d_tail);
  sums[1] = total<T>(n_sum, n_tail);
}

// ---- one entry point per instruction set, each compiled for it (the templates above are inlined into it)
#define LORDO_ENTRY_POINTS(suffix, T)                                                                              \
  float project_rows_##suffix(float* out, const float* Q, const float* G, int64_t p, int64_t q, int64_t r) {     \
    return project_rows<T>(out, Q, G, p, q, r);                                                                 \
  }                                                                                                              \
  float project_cols_##suffix(float* outT, const float* Qp, int64_t ldq, const float* G, int64_t m, int64_t n,   \
                              int64_t r) {                                                                       \
    return project_cols<T>(outT, Qp, ldq, G, m, n, r);                                                          \
  }                                                                                                              \
  void moments_##suffix(float* u, float* v, float* g, int64_t n, float b1, float b2, float bc2, float eps,          \
                        float scale, float* sums) {                                                              \
    moments<T>(u, v, g, n, b1, b2, bc2, eps, scale, sums);                                                      \
  }                                                                                                              \
  float sum_squares_##suffix(const float* x, int64_t n) {                                                       \
    SumSq<T> norm;                                                                                               \
    norm.rows(x, 1, n);                                                                                          \
    return norm.value();                                                                                         \
  }                                                                                                              \
  void apply_rows_##suffix(float* W, const float* G, float* R, const float* A, const float* B, int64_t C,        \
                           int64_t r, int64_t i0, int64_t i1, float neg_lr, float decay, float qh, bool has_qh) { \
    apply_rows<T>(W, G, R, A, B, C, r, i0, i1, neg_lr, decay, qh, has_qh);                                      \
  }

LORDO_ENTRY_POINTS(generic, Plain)
#if defined(__x86_64__)
#pragma GCC push_options
#pragma GCC target("avx2,fma")
LORDO_ENTRY_POINTS(avx2, Narrow)
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx512f,avx2,fma")
LORDO_ENTRY_POINTS(avx512, Wide)
#pragma GCC pop_options
#endif

struct Isa {
  std::string name;
  decltype(&project_rows_generic) project_rows;
  decltype(&project_cols_generic) project_cols;
  decltype(&apply_rows_generic) apply_rows;
  decltype(&sum_squares_generic) sum_squares;
  decltype(&moments_generic) moments;
};

std::vector<Isa> available() {
  std::vector<Isa> isas;
#if defined(__x86_64__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma"))
    isas.push_back({"avx512", project_rows_avx512, project_cols_avx512, apply_rows_avx512, sum_squares_avx512, moments_avx512});
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
    isas.push_back({"avx2", project_rows_avx2, project_cols_avx2, apply_rows_avx2, sum_squares_avx2, moments_avx2});
#endif
  isas.push_back({"generic", project_rows_generic, project_cols_generic, apply_rows_generic, sum_squares_generic, moments_generic});
  return isas;
}

const std::vector<Isa> kIsas = available();
const Isa* isa = &kIsas.front();   // the widest this CPU has

// each(i) for i in [0, n), items side by side on the intra-op threads
template <typename F>
void for_each(int64_t n, const F& each) {
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) each(i);
  });
}

void check_matrix(const torch::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous(),
              "lordo lowrank_cpu: ", what, " must be a contiguous float32 CPU tensor");
}

void check_bucket(const std::vector<torch::Tensor>& mats, const torch::Tensor& Q, const char* what) {
  for (const auto& t : mats) {
    check_matrix(t, what);
    TORCH_CHECK(t.sizes() == mats[0].sizes(), "lordo lowrank_cpu: a bucket's matrices share a shape");
  }
  check_matrix(Q, "Q");
  TORCH_CHECK(Q.dim() == 3 && Q.size(0) == (int64_t)mats.size(), "lordo lowrank_cpu: Q is (matrices, side, rank)");
}

}  // namespace

// The instruction sets this CPU can run the kernels with, widest first: "avx512", "avx2", "generic".
std::vector<std::string> isas() {
  std::vector<std::string> names;
  for (const auto& i : kIsas) names.push_back(i.name);
  return names;
}

// The instruction set the kernels use (the widest, unless switched); `name` (if given) switches to another of
// `isas()` (the results are the same: tests compare them). Returns the one in use before.
std::string set_isa(const std::string& name) {
  const std::string before = isa->name;
  if (!name.empty()) {
    auto it = std::find_if(kIsas.begin(), kIsas.end(), [&](const Isa& i) { return i.name == name; });
    TORCH_CHECK(it != kIsas.end(), "lordo lowrank_cpu: instruction set ", name, " is not available on this CPU");
    isa = &*it;
  }
  return before;
}

// Per matrix j of a bucket: out[j] (r x q, oriented) = Q[j]^T G_j and ||G_j||. G_j as stored: p x q, or q x p
// when `transposed`; out (n, r, q) is laid out like the weights (stored (n, q, r) when `transposed`).
torch::Tensor project_and_norm(torch::Tensor out, torch::Tensor Q, std::vector<torch::Tensor> grads, bool transposed) {
  check_bucket(grads, Q, "a gradient");
  const int64_t n = grads.size(), r = Q.size(2);
  torch::Tensor norms = torch::empty({n}, Q.options());
  if (n == 0) return norms;
  const torch::Tensor stored = transposed ? out.mT() : out;
  check_matrix(stored, "out (as stored)");
  const int64_t rows = grads[0].size(0), cols = grads[0].size(1), ldq = (r + 15) / 16 * 16;
  TORCH_CHECK(stored.size(0) == n && stored.size(1) == (transposed ? rows : r) &&
                  stored.size(2) == (transposed ? r : cols) && Q.size(1) == (transposed ? cols : rows),
              "lordo lowrank_cpu: out, Q and the gradients' shapes do not match");
  float* norm = norms.data_ptr<float>();
  for_each(n, [&](int64_t j) {
    const float *G = grads[j].data_ptr<float>(), *q = Q[j].data_ptr<float>();
    float* o = stored[j].data_ptr<float>();
    if (!transposed) {
      norm[j] = std::sqrt(isa->project_rows(o, q, G, rows, cols, r));
      return;
    }
    std::vector<float> Qp(cols * ldq, 0.f);   // Q with its rows padded to whole vectors
    for (int64_t c = 0; c < cols; ++c) std::copy(q + c * r, q + c * r + r, Qp.begin() + c * ldq);
    norm[j] = std::sqrt(isa->project_cols(o, Qp.data(), ldq, G, rows, cols, r));
  });
  return norms;
}

// The norm of each tensor (contiguous float32, any shape): sums of squares over chunks of a fixed 2^16 entries,
// chunks side by side on the threads, then added per tensor in order (the same result at any thread count).
torch::Tensor norms(std::vector<torch::Tensor> tensors) {
  constexpr int64_t chunk = 1 << 16;
  std::vector<int64_t> first(tensors.size() + 1, 0);   // each tensor's first chunk
  for (size_t t = 0; t < tensors.size(); ++t) {
    check_matrix(tensors[t], "a tensor");
    first[t + 1] = first[t] + (tensors[t].numel() + chunk - 1) / chunk;
  }
  std::vector<float> partial(first.back());
  for_each(first.back(), [&](int64_t c) {
    const int64_t t = std::upper_bound(first.begin(), first.end(), c) - first.begin() - 1, at = (c - first[t]) * chunk;
    partial[c] = isa->sum_squares(tensors[t].data_ptr<float>() + at, std::min(chunk, tensors[t].numel() - at));
  });
  torch::Tensor out = torch::empty({(int64_t)tensors.size()}, torch::kFloat);
  float* norm = out.data_ptr<float>();
  for (size_t t = 0; t < tensors.size(); ++t) {
    float s = 0.f;
    for (int64_t c = first[t]; c < first[t + 1]; ++c) s += partial[c];
    norm[t] = std::sqrt(s);
  }
  return out;
}

// The Adam moments of a bucket's low-rank gradients in place (`moments` above; low <- scale u / D), per matrix j:
// (sum of D, sum of (u / D)^2). u, v and low are (n, r, q), laid out alike (stored contiguous or transposed).
torch::Tensor adam_moments(torch::Tensor u, torch::Tensor v, torch::Tensor low, double b1, double b2, double bc2,
                           double eps, double scale) {
  TORCH_CHECK(u.sizes() == v.sizes() && u.sizes() == low.sizes() && u.dim() == 3 && u.strides() == v.strides() &&
                  u.strides() == low.strides(),
              "lordo lowrank_cpu: the moments and the low-rank gradients share a shape and a layout");
  const bool transposed = !u.is_contiguous();
  const torch::Tensor su = transposed ? u.mT() : u, sv = transposed ? v.mT() : v, sl = transposed ? low.mT() : low;
  for (const auto* t : {&su, &sv, &sl}) check_matrix(*t, "a moment (as stored)");
  const int64_t n = u.size(0), each = u.size(1) * u.size(2);
  torch::Tensor sums = torch::empty({n, 2}, torch::kFloat);
  float *pu = su.data_ptr<float>(), *pv = sv.data_ptr<float>(), *pl = sl.data_ptr<float>(), *ps = sums.data_ptr<float>();
  for_each(n, [&](int64_t j) {
    isa->moments(pu + j * each, pv + j * each, pl + j * each, each, b1, b2, bc2, eps, scale, ps + 2 * j);
  });
  return sums;
}

// Per matrix j of a bucket, W_j, G_j and R_j as stored: W_j <- decay W_j - lr Q_j N_j (+ qh_j G_j when `qh` is
// given), R_j += G_j (when `ef` is given). Threads take whole matrices, or runs of a matrix's rows when the bucket
// has fewer matrices than threads (rows are independent).
void apply_lowrank(std::vector<torch::Tensor> weights, std::vector<torch::Tensor> grads, std::vector<torch::Tensor> ef,
                   torch::Tensor Q, torch::Tensor N, bool transposed, double lr, double decay, std::vector<double> qh) {
  check_bucket(weights, Q, "a weight");
  check_bucket(grads, Q, "a gradient");
  if (!ef.empty()) check_bucket(ef, Q, "an error-feedback buffer");
  const int64_t n = weights.size();
  if (n == 0) return;
  TORCH_CHECK(grads.size() == weights.size() && (ef.empty() || ef.size() == weights.size()) &&
                  (qh.empty() || (int64_t)qh.size() == n),
              "lordo lowrank_cpu: one gradient, buffer and qh per weight");
  const int64_t rows = weights[0].size(0), cols = weights[0].size(1), r = Q.size(2);
  // the rows of Q N for W's stored rows: Q's; for W stored as (Q N)^T = N^T Q^T, N^T's (N is laid out like the
  // weights, so N^T is as stored)
  const torch::Tensor A = transposed ? N.mT() : Q, B = transposed ? Q.mT().contiguous() : N;
  check_matrix(A, transposed ? "N (as stored)" : "Q");
  check_matrix(B, "N");
  TORCH_CHECK(A.size(1) == rows && B.size(2) == cols && A.size(2) == r && B.size(1) == r,
              "lordo lowrank_cpu: Q, N and the weights' shapes do not match");
  const int64_t parts = std::min<int64_t>(rows, (at::get_num_threads() + n - 1) / n), per = (rows + parts - 1) / parts;
  for_each(n * parts, [&](int64_t item) {
    const int64_t j = item / parts, i0 = item % parts * per, i1 = std::min(rows, i0 + per);
    if (i0 >= i1) return;
    isa->apply_rows(weights[j].data_ptr<float>(), grads[j].data_ptr<float>(),
                    ef.empty() ? nullptr : ef[j].data_ptr<float>(), A[j].data_ptr<float>(), B[j].data_ptr<float>(),
                    cols, r, i0, i1, (float)-lr, (float)decay, qh.empty() ? 0.f : (float)qh[j], !qh.empty());
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("project_and_norm", &project_and_norm, "Q^T G and ||G|| per matrix of a bucket",
        py::call_guard<py::gil_scoped_release>());
  m.def("apply_lowrank", &apply_lowrank, "R += G; W <- decay W - lr Q N + qh G per matrix of a bucket",
        py::call_guard<py::gil_scoped_release>());
  m.def("adam_moments", &adam_moments, "the Adam moments of a bucket's low-rank gradients, in one pass",
        py::call_guard<py::gil_scoped_release>());
  m.def("norms", &norms, "the norm of each contiguous float32 tensor", py::call_guard<py::gil_scoped_release>());
  m.def("isas", &isas, "the instruction sets this CPU can run the kernels with, widest first");
  m.def("set_isa", &set_isa, "the instruction set in use; switch to another this CPU has", py::arg("name") = "");
}
