// The full-size part of LoRDO's low-rank step on CPU, for float32 matrices: the same ATen products and norms
// as lordo/optim.py's `_project_and_norm` and `_apply_lowrank_` with one thread, on the same blocks of rows and
// with the same roundings, so the results are bit-identical to them. What changes: the error-feedback sum R += G
// and the QH term W += qh G are one loop over each block (one pass instead of two), a bucket's matrices are
// visited from C++ (about 1,500 fewer Python-level operations a step), and with several threads each thread
// takes whole matrices, or runs of blocks when a bucket has fewer matrices than threads (the one-thread bits at
// any thread count). Built on first use by lordo/kernels.py.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

namespace {

// W += G * qh (and R += G) over n entries, rounded as ATen's addcmul_ rounds it: with ATen's vector kernels
// (AVX2, AVX512) the multiply-add is fused, with its scalar fallback (capability DEFAULT) it is not. Both
// variants are written out, so the compiler's contraction settings do not decide.
#if defined(__x86_64__)
#define LORDO_FMA_TARGET __attribute__((target("avx2,fma")))
#else
#define LORDO_FMA_TARGET
#endif

LORDO_FMA_TARGET void add_fused(float* __restrict w, const float* __restrict g, float* __restrict r, int64_t n,
                                float qh) {
  if (r != nullptr) {
    for (int64_t i = 0; i < n; ++i) {
      const float gi = g[i];
      r[i] += gi;
      w[i] = __builtin_fmaf(gi, qh, w[i]);
    }
  } else {
    for (int64_t i = 0; i < n; ++i) w[i] = __builtin_fmaf(g[i], qh, w[i]);
  }
}

#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
void add_unfused(float* __restrict w, const float* __restrict g, float* __restrict r, int64_t n, float qh) {
  if (r != nullptr) {
    for (int64_t i = 0; i < n; ++i) {
      const float gi = g[i];
      r[i] += gi;
      w[i] = w[i] + gi * qh;
    }
  } else {
    for (int64_t i = 0; i < n; ++i) w[i] = w[i] + g[i] * qh;
  }
}
#pragma GCC pop_options

void accumulate(float* __restrict r, const float* __restrict g, int64_t n) {
  for (int64_t i = 0; i < n; ++i) r[i] += g[i];
}

// The element-wise part of a block: R += G (when r), then W += G * qh (when has_qh).
void elementwise(float* w, const float* g, float* r, int64_t n, bool has_qh, float qh, bool fma) {
  if (!has_qh)
    accumulate(r, g, n);
  else if (fma)
    add_fused(w, g, r, n, qh);
  else
    add_unfused(w, g, r, n, qh);
}

// oneMKL's per-thread thread count, declared weak so that the kernels also load with a torch built without MKL.
// torch turns MKL's dynamic adjustment off, so a product called from a thread of a parallel region would start
// threads of its own (and round as a threaded product does).
extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));

// BLAS on one thread for this object's lifetime (when torch's BLAS is MKL).
struct SerialBlas {
  int previous = 0;
  SerialBlas() {
    if (MKL_Set_Num_Threads_Local) previous = MKL_Set_Num_Threads_Local(1);
  }
  ~SerialBlas() {
    if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(previous);
  }
};

// each(i) for i in [0, n), with several intra-op threads side by side, each i on one thread with its BLAS
// products on one thread (ATen runs serially inside a parallel region): every item goes through the one-thread
// code, so the results are the one-thread results whatever the thread count.
template <typename F>
void for_each(int64_t n, const F& each) {
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    SerialBlas serial;
    for (int64_t i = begin; i < end; ++i) each(i);
  });
}

void check_matrix(const torch::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous(),
              "lordo lowrank_cpu: ", what, " must be a contiguous float32 CPU tensor");
}

}  // namespace

// Per matrix j: out[j] = Q[j]^T G_j for the oriented G_j (stored transposed when `transposed`), and the norm of
// G_j, taken block by block of `rows` stored rows (the norm reads each block again from cache).
torch::Tensor project_and_norm(torch::Tensor out, torch::Tensor Q, std::vector<torch::Tensor> grads,
                               bool transposed, int64_t rows) {
  for (const auto& G : grads) check_matrix(G, "a gradient");
  std::vector<torch::Tensor> norms(grads.size());
  for_each(grads.size(), [&](int64_t j) {
    const torch::Tensor G = grads[j].detach(), q = Q[j], o = out[j];
    std::vector<torch::Tensor> parts;
    int64_t k = 0;
    for (int64_t r0 = 0; r0 < G.size(0); r0 += rows, ++k) {
      const int64_t m = std::min(rows, G.size(0) - r0);
      const torch::Tensor g = G.narrow(0, r0, m);
      if (transposed) {   // a block of G's stored rows gives the same rows of (Q^T G)^T
        torch::Tensor o_rows = o.mT().narrow(0, r0, m);
        at::mm_out(o_rows, g, q);
      } else {            // a block's share of the sum over Q's rows (beta 0 first: out's old values ignored)
        o.addmm_(q.narrow(0, r0, m).mT(), g, k ? 1.0 : 0.0, 1.0);
      }
      parts.push_back(at::linalg_vector_norm(g));
    }
    norms[j] = at::linalg_vector_norm(at::stack(parts));
  });
  return at::stack(norms);
}

// Per matrix j, W_j, G_j and R_j as stored, block by block of `rows` stored rows: W_j <- decay W_j - lr Q_j N_j,
// then in one loop R_j += G_j (when `ef` is given; exact, so its place in the order does not matter) and
// W_j += qh_j G_j (when `qh` is given). The blocks are independent: threads take whole matrices, or with
// fewer matrices than threads, runs of a matrix's blocks.
void apply_lowrank(std::vector<torch::Tensor> weights, std::vector<torch::Tensor> grads,
                   std::vector<torch::Tensor> ef, torch::Tensor Q, torch::Tensor N, bool transposed, double lr,
                   double decay, std::vector<double> qh, int64_t rows, bool fma) {
  const int64_t n = weights.size();
  for (int64_t j = 0; j < n; ++j) {
    check_matrix(weights[j], "a weight");
    check_matrix(grads[j], "a gradient");
    if (!ef.empty()) check_matrix(ef[j], "an error-feedback buffer");
    TORCH_CHECK(weights[j].sizes() == weights[0].sizes(), "lordo lowrank_cpu: a bucket's matrices share a shape");
  }
  if (n == 0) return;
  const int64_t blocks = (weights[0].size(0) + rows - 1) / rows, cols = weights[0].size(1);
  const int64_t parts = std::min(blocks, (at::get_num_threads() + n - 1) / n), per_part = (blocks + parts - 1) / parts;
  for_each(n * parts, [&](int64_t item) {
    const int64_t j = item / parts, first = item % parts * per_part, last = std::min(blocks, first + per_part);
    const torch::Tensor W = weights[j].detach(), G = grads[j].detach();
    float* r = ef.empty() ? nullptr : ef[j].data_ptr<float>();
    // rows of Q N for a block of W's stored rows: Q's rows; for W stored as (Q N)^T = N^T Q^T, N^T's rows
    const torch::Tensor A = transposed ? N[j].mT() : Q[j], B = transposed ? Q[j].mT() : N[j];
    for (int64_t k = first; k < last; ++k) {
      const int64_t r0 = k * rows, m = std::min(rows, W.size(0) - r0), offset = r0 * cols;
      W.narrow(0, r0, m).addmm_(A.narrow(0, r0, m), B, decay, -lr);
      if (r || !qh.empty())
        elementwise(W.data_ptr<float>() + offset, G.data_ptr<float>() + offset, r ? r + offset : nullptr,
                    m * cols, !qh.empty(), qh.empty() ? 0.f : (float)qh[j], fma);
    }
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("project_and_norm", &project_and_norm, "Q^T G and ||G|| per matrix of a bucket",
        py::call_guard<py::gil_scoped_release>());
  m.def("apply_lowrank", &apply_lowrank, "R += G; W <- decay W - lr Q N + qh G per matrix of a bucket",
        py::call_guard<py::gil_scoped_release>());
}
