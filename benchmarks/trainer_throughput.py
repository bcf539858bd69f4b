"""Trainer tokens/s against a plain hand-written PyTorch loop, in the same process.

    python benchmarks/trainer_throughput.py [--preset tiny] [--steps 60] [--batch-size 8] [--seq-len 128]

Baseline: the same GPT, the same batches (lordo.data.Batches), torch.optim.AdamW (foreach), a bare
forward/backward/step loop, run before and after the trainer's runs; "vs plain" is against the mean of
the two. Then `lordo.train` for ddp and lordo with 1 and 4 simulated workers
(the trainer's own tokens/s, which excludes evaluation). Targets (issue): the trainer at >= 0.9x
the plain loop; 4 simulated workers at >= 0.9x one worker's tokens/s. With --bf16 both sides use
bf16 autocast; on a GPU (--device cuda) add --mfu to print model FLOPs utilization.
"""

import argparse
import os
import platform
import tempfile
import time

import torch

import lordo
import lordo.kernels
from lordo.data import Batches, prepare
from lordo.model import GPT, model_config


def plain_loop(args, data, device) -> float:
    """Tokens/s of a bare AdamW loop (timed after `warmup` steps)."""
    model = GPT(model_config(args.preset, vocab_size=data.vocab_size, max_seq_len=args.seq_len)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.0, foreach=True)
    batches = Batches(data.train, args.seq_len, args.batch_size)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            sync(device)
            start = time.perf_counter()
        x, y = (t.to(device) for t in next(batches))
        with autocast:
            _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    sync(device)
    return args.steps * args.batch_size * args.seq_len / (time.perf_counter() - start)


def trainer(args, method: str, workers: int, root: str) -> float:
    # Timing the whole run minus evaluation: warmup steps are included (the trainer reports no split),
    # so the run is made long enough for them not to matter.
    run = lordo.train(method=method, preset=args.preset, workers=workers, steps=args.warmup + args.steps,
                      batch_size=args.batch_size, seq_len=args.seq_len, bf16=args.bf16, lr=3e-3, rank=args.rank,
                      sync_every=16, eval_every=10**9, eval_batches=1, log_every=10**9, diagnostics=False,
                      device=args.device, runs_dir=root, progress=False, force=True)
    return run.summary["tokens_per_s"]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--mfu", action="store_true", help="print model FLOPs utilization (GPU peak: --peak-tflops)")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak (H100 SXM: 989)")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.set_flush_denormal(True)
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    data = prepare("shakespeare")
    if device.type == "cpu":   # load (or build, once per machine and source: about 30 s) the kernels untimed
        lordo.kernels.lowrank_cpu()
    cpu = platform.processor() or platform.machine()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu}, device {device}, "
          f"preset {args.preset}, {args.steps} steps of {args.batch_size}x{args.seq_len} tokens "
          f"per worker{', bf16' if args.bf16 else ''}")
    # The plain loop runs before and after the trainer's runs and the ratios use the mean of the two, so that
    # a shared machine's drift over the minutes between them shows (both are printed) instead of biasing one side.
    before = plain_loop(args, data, device)
    rows = [("plain loop, before", 1, before)]
    with tempfile.TemporaryDirectory() as root:
        for method in ("ddp", "lordo"):
            for workers in (1, 4):
                rows.append((f"lordo.train {method}", workers, trainer(args, method, workers, root)))
    after = plain_loop(args, data, device)
    rows.insert(1, ("plain loop, after", 1, after))
    base = (before + after) / 2
    one = {name: tps for name, workers, tps in rows if workers == 1}
    print(f"\n{'':<22}{'workers':>8}{'tokens/s':>11}{'vs plain':>10}{'vs 1 worker':>13}")
    for name, workers, tps in rows:
        print(f"{name:<22}{workers:>8}{tps:>11.0f}{tps / base:>9.2f}x{tps / one[name]:>12.2f}x")
    trainer_ratio = one["lordo.train ddp"] / base
    scaling = min(tps / one[name] for name, workers, tps in rows if workers == 4)
    print(f"\ntarget: trainer >= 0.9x plain loop: {trainer_ratio:.2f}x {'met' if trainer_ratio >= 0.9 else 'NOT met'}")
    print(f"target: 4 simulated workers >= 0.9x one worker: {scaling:.2f}x {'met' if scaling >= 0.9 else 'NOT met'}")
    if args.mfu:
        model = GPT(model_config(args.preset, vocab_size=data.vocab_size, max_seq_len=args.seq_len), device="meta")
        flops = model.flops_per_token(args.seq_len)
        for name, workers, tps in rows:
            print(f"MFU {name} ({workers} workers): {tps * flops / (args.peak_tflops * 1e12):.1%}")


if __name__ == "__main__":
    main()
