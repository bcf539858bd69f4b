"""The `lordo` command.

    lordo train --method lordo --preset tiny --corpus shakespeare --workers 4 --steps 300 \\
                --batch-size 8 --seq-len 128 --rank 8 --sync-every 16 --omega 0.7 --lr 3e-3 --out runs/x
    lordo train --config configs/paper/720m_lordo.yaml --launcher torchrun --nproc-per-node 8
    lordo prepare --corpus brown
    lordo export runs/x --to exported/x
    lordo eval runs/x --tasks core --limit 100

Every `lordo train` option is a field of `lordo.config.TrainConfig`; values are read as YAML
scalars (8, 0.25, null, true), lists as `0.9,0.95`.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from typing import Any

import yaml

from lordo.config import TrainConfig, load_config, make_config
from lordo.launch import LaunchError


def _value(text: str) -> Any:
    if "," in text:
        return [_value(part) for part in text.split(",")]
    return yaml.safe_load(text)


def _train_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train one configuration (cached by its hash)",
                       description="Train one configuration. Options are TrainConfig fields.")
    p.add_argument("--config", help="YAML/JSON file of TrainConfig fields (options given here override it)")
    p.add_argument("--force", action="store_true", help="retrain even if a finished run is cached")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--stop-at", type=int, default=None, help="stop after this step with a checkpoint")
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None)
        else:
            p.add_argument(flag, dest=f.name, type=_value, default=None, metavar=f.name.upper())


def _train(args: argparse.Namespace) -> None:
    given = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if getattr(args, f.name) is not None}
    cfg = load_config(args.config, **given) if args.config else make_config(given)
    from lordo.trainer import train
    run = train(cfg, force=args.force, resume=True if args.resume else None, stop_at=args.stop_at)
    s = run.summary
    if "stopped_at" in s:
        print(f"stopped after step {s['stopped_at']}; resume with --resume --out {run.dir}")
        return
    print(f"run: {run.dir}\nval_loss {s['val_loss']:.4f}  val_ppl {s['val_ppl']:.2f}  "
          f"comm {s['comm_bytes'] / 2**20:.1f} MiB/worker  {s['tokens_per_s']:.0f} tokens/s")


def _prepare(args: argparse.Namespace) -> None:
    from lordo.data import prepare
    data = prepare(args.corpus, args.tokenizer, args.vocab_size)
    print(f"{data.dir}: {len(data.train):,} train / {len(data.val):,} validation tokens, vocab {data.vocab_size}")


def _export(args: argparse.Namespace) -> None:
    from lordo.evaluate import export_hf
    print(export_hf(args.run, args.to))


def _eval(args: argparse.Namespace) -> None:
    from lordo.evaluate import evaluate_run
    evaluate_run(args.run, tasks=args.tasks, limit=args.limit, num_fewshot=args.num_fewshot,
                 batch_size=args.batch_size, device=args.device)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lordo", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    p = sub.add_parser("prepare", help="fetch, tokenize and cache a corpus")
    p.add_argument("--corpus", default="shakespeare")
    p.add_argument("--tokenizer", default="bpe")
    p.add_argument("--vocab-size", type=int, default=8192)
    p = sub.add_parser("export", help="write a run's model as a transformers LlamaForCausalLM checkpoint")
    p.add_argument("run", help="run directory (runs/<name>)")
    p.add_argument("--to", required=True, help="output directory")
    p = sub.add_parser("eval", help="lm-eval downstream tasks (and perplexity) on a run's model")
    p.add_argument("run", help="run directory (runs/<name>)")
    p.add_argument("--tasks", default="core", help="'core' (offline suite) or comma-separated lm-eval task names")
    p.add_argument("--limit", type=int, default=None, help="examples per task")
    p.add_argument("--num-fewshot", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default=None)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    handler = {"train": _train, "prepare": _prepare, "export": _export, "eval": _eval}[args.command]
    try:
        handler(args)
    except (ValueError, FileNotFoundError, ConnectionError, LaunchError) as e:
        print(f"lordo {args.command}: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
