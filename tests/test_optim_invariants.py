"""Properties the fast optimizer (`lordo.optim`) must have, checked on small least-squares problems.

* subspace stagnation: with omega = 1 (`lordo_global`) the averaged pseudo-gradient stays in span(Q)
  and the refreshed Q spans the same subspace; the full-rank term of `lordo` (omega < 1) escapes it;
* `ddp` with M workers is one process on the concatenated batch;
* `local_adam` syncing every step on identical data is `torch.optim.AdamW`;
* replicas (parameters, and the shared Q) are bit-identical after every synchronization;
* exact equalities between methods: `lordo` with omega = 1 is `lordo_global`; with M = 1,
  `lordo_local` is `lordo_global`.
"""

import math

import pytest
import torch

from lordo.comm import run_simulated
from lordo.optim import FULL_RANK_RECORD, make_optimizer
from lordo.projection import visited_rank
from lordo.reference import compute_projection, oriented

RANK = 2
SHAPES = {"w": (8, 12), "w_t": (10, 6), "bias": (12,)}   # p < q, p > q (projected on the right), 1-D
HP = dict(lr=0.01, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.0, rank=RANK, sync_every=3, clip=None)


def init_params(dtype):
    g = torch.Generator().manual_seed(0)
    return {n: 0.3 * torch.randn(s, generator=g, dtype=dtype) for n, s in SHAPES.items()}


def batch(worker, step, dtype, n=16):
    g = torch.Generator().manual_seed(1000 * worker + step)
    x = torch.randn(n, 8, generator=g, dtype=dtype)
    z = torch.randn(n, 10, generator=g, dtype=dtype)
    y = torch.randn(n, 12, generator=g, dtype=dtype)
    return x, z, y


def loss(params, x, z, y):
    pred = x @ params["w"] + (z @ params["w_t"]).repeat(1, 2) + params["bias"]
    return ((pred - y) ** 2).mean()


def train(method, workers, steps, dtype=torch.float32, data=batch, on_step=None, **hp):
    """Run the fast optimizer on M simulated workers (comm=None for M = 1); return each worker's result.

    `on_step(opt, params)` is called after every step; the worker returns the list of its results.
    """
    def worker(comm):
        rank = comm.rank
        params = {n: t.clone().requires_grad_() for n, t in init_params(dtype).items()}
        comm = comm if workers > 1 else None
        groups = [{"params": list(params.values()), "param_names": list(params)}]
        opt = make_optimizer(method, groups, comm=comm, **{**HP, **hp})
        opt.refuse_averaged_gradients = data is batch    # other data functions may feed every worker the same
        log = []
        for step in range(steps):
            loss(params, *data(rank, step, dtype)).backward()
            opt.step()
            opt.zero_grad()
            if on_step is not None:
                log.append(on_step(opt, params))
        return log

    return run_simulated(worker, workers)


def snapshot(opt, params):
    return opt.synced, {n: p.detach().clone() for n, p in params.items()}


def first_projection(workers, dtype):
    """Q at step 0 of a global method: from the worker-averaged first gradient (every worker at init)."""
    grads = []
    for m in range(workers):
        params = {n: t.clone().requires_grad_() for n, t in init_params(dtype).items()}
        loss(params, *batch(m, 0, dtype)).backward()
        grads.append({n: p.grad for n, p in params.items()})
    return {n: sum(g[n] for g in grads) / workers for n in ("w", "w_t")}


@pytest.mark.parametrize("method", ["lordo_global", "lordo"])
def test_subspace_stagnation(method):
    """Recomputed from the parameters, and as the optimizer's own diagnostics report it."""
    workers, steps = 2, 15
    on_step = lambda opt, params: (*snapshot(opt, params), opt.pop_diagnostics())
    log = train(method, workers, steps, on_step=on_step, diagnostics=True, proj_method="svd")[0]
    assert [s for s, _, _ in log] == [t % 3 == 2 for t in range(steps)]
    synced = [init_params(torch.float32)] + [p for s, p, _ in log if s]
    records = [r for _, _, rs in log for r in rs]
    sources = [first_projection(workers, torch.float32)] + [
        {n: after[n] - before[n] for n in ("w", "w_t")} for before, after in zip(synced, synced[1:])]
    stagnant = method == "lordo_global"
    for name in ("w", "w_t"):
        transposed = name == "w_t"
        qs = [compute_projection(oriented(x[name], transposed), RANK) for x in sources]
        for q_old, q_new, x in zip(qs, qs[1:], sources[1:]):
            delta = oriented(x[name], transposed)
            residual = torch.linalg.norm(delta - q_old @ (q_old.T @ delta)) / torch.linalg.norm(delta)
            similarity = (torch.linalg.svdvals(q_new.T @ q_old) ** 2).mean()
            if stagnant:
                assert residual < 1e-5 and similarity > 1 - 1e-5
            else:
                assert residual > 0.03 and similarity < 1 - 1e-3

        own = [r for r in records if r["param"] == name]
        assert len(own) == 1 + steps // 3 and own[0]["step"] == 0 and own[0]["basis_similarity"] is None
        assert [r["step"] for r in own[1:]] == [3, 6, 9, 12, 15]
        for r in own[1:]:
            if stagnant:   # energy_outside is 1 - inside/total: float32 resolves it to about 1e-7
                assert r["energy_outside"] < 1e-5 and r["basis_similarity"] > 1 - 1e-5
            else:
                assert r["energy_outside"] > 1e-3 and r["basis_similarity"] < 1 - 1e-3
        dims = [r["explored_dim"] for r in own]
        ranks = [r["explored_rank"] for r in own]
        if stagnant:
            assert dims == [RANK] * len(own)
            assert max(abs(v - RANK) for v in ranks) < 1e-4
        else:
            assert dims == sorted(dims) and dims[-1] > RANK
            assert ranks[0] == pytest.approx(RANK) and RANK < ranks[-1] <= dims[-1] + 1e-9


def test_ddp_workers_equal_one_process_on_the_concatenated_batch():
    def concatenated(worker, step, dtype):
        parts = [batch(m, step, dtype) for m in range(3)]
        return tuple(torch.cat(ts) for ts in zip(*parts))

    hp = dict(weight_decay=0.1, clip=0.5)   # the clip acts on the averaged gradient, so it bites alike
    distributed = train("ddp", 3, 6, on_step=snapshot, **hp)
    single = train("ddp", 1, 6, data=concatenated, on_step=snapshot, **hp)
    for (_, got), (_, want) in zip(distributed[0], single[0]):
        for n in want:
            torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("workers", [1, 2])
def test_local_adam_syncing_every_step_on_identical_data_is_adamw(workers):
    hp = dict(lr=0.01, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)
    same_data = lambda worker, step, dtype: batch(0, step, dtype)
    got = train("local_adam", workers, 8, data=same_data, on_step=snapshot, sync_every=1, **hp)

    params = {n: t.clone().requires_grad_() for n, t in init_params(torch.float32).items()}
    adamw = torch.optim.AdamW(list(params.values()), foreach=True, **hp)
    for step in range(8):
        loss(params, *batch(0, step, torch.float32)).backward()
        adamw.step()
        adamw.zero_grad()
        for m in range(workers):
            for n, p in params.items():
                torch.testing.assert_close(got[m][step][1][n], p.detach(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("method,proj_method", [("ddp", "svd"), ("lowrank_ddp", "randomized"),
                                                ("local_adam", "svd"), ("lordo_local", "svd"),
                                                ("lordo_global", "power"), ("lordo", "randomized")])
def test_replicas_bit_identical_after_sync(method, proj_method):
    """Parameters after every sync (every step for ddp methods); Q after every refresh (shared Q)."""
    def on_step(opt, params):
        qs = [s["Q"] for s in opt.state_dict()["state"].values() if "Q" in s]
        return (*snapshot(opt, params), qs)

    log = train(method, 2, 7, on_step=on_step, proj_method=proj_method, proj_every=2)
    every_step = method in ("ddp", "lowrank_ddp")
    for (synced, p0, q0), (_, p1, q1) in zip(*log):
        if synced or every_step:
            assert all(torch.equal(p0[n], p1[n]) for n in p0)
        else:
            assert not all(torch.equal(p0[n], p1[n]) for n in p0)
        if method == "lordo_local":
            assert not any(torch.equal(a, b) for a, b in zip(q0, q1))
        else:
            assert all(torch.equal(a, b) for a, b in zip(q0, q1))


@pytest.mark.parametrize("method,other,workers,hp", [
    ("lordo", "lordo_global", 2, dict(omega=1.0)),
    ("lordo_local", "lordo_global", 1, dict()),
])
def test_methods_that_coincide(method, other, workers, hp):
    a = train(method, workers, 7, on_step=snapshot, **hp)
    b = train(other, workers, 7, on_step=snapshot, **hp)
    for (_, pa), (_, pb) in zip(a[0], b[0]):
        assert all(torch.equal(pa[n], pb[n]) for n in pa)


def test_visited_rank_weighs_directions_by_visits():
    """Participation ratio of V = sum Q Q^T: r for one subspace however often, p for an even cover, and
    in between (not p) when a second subspace is visited once against many visits of the first."""
    eye = torch.eye(6, dtype=torch.float64)
    first, second = eye[:, :2], eye[:, 2:4]
    v = lambda qs: sum(q @ q.T for q in qs)[None]
    assert visited_rank(v([first] * 5)).item() == pytest.approx(2)
    assert visited_rank(v([first, second, eye[:, 4:]])).item() == pytest.approx(6)
    once = visited_rank(v([first] * 9 + [second])).item()
    assert 2 < once < 3   # (20)^2 / (2 * 81 + 2 * 1) = 2.44


@pytest.mark.parametrize("qh_scale", ["mean_denom", "update_rms"])
def test_the_qh_terms_size_is_recorded_before_each_synchronization(qh_scale):
    """qh_to_lowrank: the full-rank QH term's size over the low-rank term's at the step that ends an interval. With
    qh_scale="update_rms" the two have the same RMS, so the ratio is (1 - omega) / omega; lordo_global has none."""
    on_step = lambda opt, params: opt.pop_diagnostics()
    log = train("lordo", 2, 9, on_step=on_step, diagnostics=True, omega=0.6, qh_scale=qh_scale)[0]
    matrices = lambda log: [r for rs in log for r in rs if r["param"] != FULL_RANK_RECORD]
    ratios = [r["qh_to_lowrank"] for r in matrices(log) if r["step"] > 0]
    assert len(ratios) == 3 * 2 and all(math.isfinite(x) and x > 0 for x in ratios)
    if qh_scale == "update_rms":
        assert ratios == pytest.approx([0.4 / 0.6] * len(ratios), rel=1e-5)
    else:
        assert max(abs(x - 0.4 / 0.6) for x in ratios) > 1e-2
    log = train("lordo_global", 2, 3, on_step=on_step, diagnostics=True)[0]
    assert {r["qh_to_lowrank"] for r in matrices(log)} == {None}


@pytest.mark.parametrize("method", ["lordo", "local_adam"])
def test_update_coherence_is_one_for_identical_workers_and_below_otherwise(method):
    """Coherence ||mean_m Delta_m|| / mean_m ||Delta_m|| (diagnostics): 1 when every worker sees the same batches,
    in (0, 1) when they differ (triangle inequality), for each part it records."""
    def coherences(data):
        logs = train(method, 2, 6, data=data, diagnostics=True, on_step=lambda opt, _: opt.pop_diagnostics())
        return [v for rec in logs[0] for r in rec for k, v in r.items() if k.startswith("coherence")]

    same = coherences(lambda worker, step, dtype: batch(0, step, dtype))
    differ = coherences(batch)
    parts = 1 if method == "local_adam" else 1 + 3 * 2    # full-rank; per matrix whole, in and outside span(Q)
    assert len(same) == len(differ) == 2 * parts           # two synchronizations
    torch.testing.assert_close(torch.tensor(same), torch.ones(len(same)), rtol=0, atol=1e-5)
    assert all(0 < c < 0.999 for c in differ)


def test_averaged_states_are_counted_in_bytes_and_make_workers_states_equal():
    """average_moments="all" and ef_on_sync="average": after each sync every worker holds the same moments and error
    feedback, and each averaged state's bytes are counted by kind (float32: 4 bytes an entry, per sync)."""
    def states(opt, _):
        low = [t.clone() for b in opt.buckets for t in (b.exp_avg, b.exp_avg_sq, b.ef)]
        full = [opt.state[opt.params[i]][k].clone() for i in opt.adamw_indices for k in ("exp_avg", "exp_avg_sq")]
        return opt.synced, low + full, opt.comm_stats()["by_kind"]

    logs = train("lordo", 2, 6, average_moments="all", ef_on_sync="average", on_step=states)
    for (synced, s0, _), (_, s1, _) in zip(*logs):
        if synced:
            for a, b in zip(s0, s1):
                assert torch.equal(a, b)
    kinds = logs[0][-1][2]
    r, syncs = RANK, 2
    assert kinds["lowrank_moments"]["payload_bytes"] == syncs * 4 * 2 * (r * 12 + r * 10)   # u, v: r x q each
    assert kinds["adamw_moments"]["payload_bytes"] == syncs * 4 * 2 * 12                    # the bias's m, v
    assert kinds["error_feedback"]["payload_bytes"] == syncs * 4 * (8 * 12 + 10 * 6)
    before_sync = [s for (synced, s, _) in logs[0] if not synced]
    assert not all(torch.equal(a, b) for a, b in zip(before_sync[-1], [s for (sy, s, _) in logs[1] if not sy][-1]))


@pytest.mark.parametrize("options,named", [
    (dict(average_moments="all", state_dtype="bfloat16"), "state_dtype='bfloat16'"),
    (dict(ef_on_sync="reproject", state_dtype="bfloat16"), "state_dtype='bfloat16'"),
    (dict(average_moments="adamw", comm_dtype="float16"), "comm_dtype='float16'"),
    (dict(fullrank_lr_scale=3.0, method="local_adam"), "fullrank_lr_scale=3.0"),
    (dict(average_moments="lowrank", method="lordo_local"), "average_moments='lowrank'")])
def test_state_options_a_method_cannot_honour_are_refused_in_one_line(options, named):
    options = dict(options)
    method = options.pop("method", "lordo")
    params = [torch.nn.Parameter(torch.zeros(8, 12))]
    with pytest.raises(ValueError, match=f"^{named} is invalid: allowed") as e:
        make_optimizer(method, params, **options)
    assert "\n" not in str(e.value)
