"""The `lordo` command: train, evaluate and export LoRDO runs (distributed low-rank optimization with
infrequent communication) and prepare their corpora.

    lordo train --method lordo --preset tiny --corpus shakespeare --workers 4 --steps 300 \\
                --batch-size 8 --seq-len 128 --rank 8 --sync-every 16 --omega 0.7 --lr 3e-3 --out runs/x
    lordo train --config configs/paper/720m.yaml --method lordo --launcher torchrun --nproc-per-node 8
    lordo prepare --corpus brown
    lordo export runs/x --to exported/x
    lordo eval runs/x --tasks core --limit 100

Every `lordo train` option is a field of `lordo.config.TrainConfig`, read and checked as that field's
kind says (numbers as people write them: 3e-3, 1E-8, .5; `none` for an optional field; lists as
0.9,0.95). Bad input is one line naming the value and what is allowed, with exit status 2; Ctrl-C
stops a run with its last checkpoint intact, exit status 130.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import threading

USAGE_ERROR, INTERRUPTED = 2, 130


class Parser(argparse.ArgumentParser):
    """argparse, with its errors as one line (the usage is one --help away)."""

    def error(self, message: str) -> None:
        self.exit(USAGE_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# `lordo train --help` in sections; every other TrainConfig field is the optimizer's (method, schedule, hparams)
TRAIN_GROUPS = {
    "model": ("preset", "bf16", "device"),
    "data": ("corpus", "tokenizer", "vocab_size", "corpus_tokens", "batch_size", "grad_accum", "seq_len"),
    "optimizer": (),
    "training and evaluation": ("seed", "steps", "eval_every", "eval_batches", "log_every", "progress"),
    "distributed": ("workers", "launcher", "nproc_per_node", "nnodes", "node_rank", "rdzv_endpoint"),
    "run store": ("out", "runs_dir", "checkpoint_every"),
}


def _train_parser(sub: argparse._SubParsersAction, options: bool) -> None:
    p = sub.add_parser("train", help="train one configuration (cached by its hash)",
                       description="Train one configuration. Options are TrainConfig fields; each says its "
                                   "default and what is allowed. Switches come as --x / --no-x.")
    if not options:   # `lordo --help` stays light: the options (and torch) load only for `lordo train`
        return
    from dataclasses import fields

    from lordo.config import TrainConfig, field_help
    groups = {name: p.add_argument_group(name) for name in TRAIN_GROUPS}
    group_of = {field: name for name, names in TRAIN_GROUPS.items() for field in names}
    store = groups["run store"]
    store.add_argument("--config", help="YAML/JSON file of TrainConfig fields (options given here override it); a "
                                        "file without method: serves every method, as configs/paper/<size>.yaml")
    store.add_argument("--force", action="store_true",
                       help="retrain even if a finished run is cached (replaces only files lordo wrote)")
    store.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    store.add_argument("--stop-at", type=int, default=None, metavar="STEP",
                       help="stop after this step with a checkpoint (an int >= 1)")
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        text = field_help(f).replace("%", "%%")
        group = groups[group_of.get(f.name, "optimizer")]
        if f.type in ("bool", "bool | None"):   # default None: the config file's or the optimizer's value
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=text)
        else:   # kept as text: the config reads it as the field's kind, the same for config files
            group.add_argument(flag, dest=f.name, default=None, metavar=f.name.upper(), help=text)


def _train(args: argparse.Namespace) -> None:
    from dataclasses import fields

    from lordo.config import TrainConfig, load_config, make_config
    from lordo.launch import train
    given = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if getattr(args, f.name) is not None}
    cfg = load_config(args.config, **given) if args.config else make_config(given)
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


def build_parser(train_options: bool = True) -> argparse.ArgumentParser:
    from importlib.metadata import PackageNotFoundError, version
    try:
        installed = version("lordo")
    except PackageNotFoundError:   # run from a checkout that was never installed
        installed = "unknown (not installed)"
    description, examples = __doc__.split("\n\n")[:2]
    parser = Parser(prog="lordo", description=description.replace("`", ""),
                    epilog="examples:\n" + examples, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"lordo {installed}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser, metavar="COMMAND")
    _train_parser(sub, train_options)
    p = sub.add_parser("prepare", help="fetch, tokenize and cache a corpus (lordo train does it when needed)",
                       description="Fetch, tokenize and cache a corpus under data/cache/.")
    p.add_argument("--corpus", default="shakespeare",
                   help="shakespeare, brown, ptb, hf:<name>[:<config>] or files:<glob> (default: shakespeare)")
    p.add_argument("--tokenizer", default="bpe",
                   help="bpe (trained on the corpus), byte, gpt2 or a Hugging Face name (default: bpe)")
    p.add_argument("--vocab-size", type=int, default=8192,
                   help="vocabulary of the trained BPE, an int >= 256 (default: 8192)")
    p = sub.add_parser("export", help="write a run's model as a transformers LlamaForCausalLM checkpoint",
                       description="Write a run's model as a transformers LlamaForCausalLM checkpoint.")
    p.add_argument("run", help="run directory (runs/<name>)")
    p.add_argument("--to", required=True, help="output directory (new, empty, or an earlier export)")
    p = sub.add_parser("eval", help="lm-eval downstream tasks (and perplexity) on a run's model",
                       description="Evaluate a run's model: lm-eval downstream tasks and perplexity.")
    p.add_argument("run", help="run directory (runs/<name>)")
    p.add_argument("--tasks", default="core", help="'core' (offline suite) or comma-separated lm-eval task names")
    p.add_argument("--limit", type=int, default=None, help="examples per task (default: all)")
    p.add_argument("--num-fewshot", type=int, default=0, help="few-shot examples (default: 0)")
    p.add_argument("--batch-size", type=int, default=16, help="an int >= 1 (default: 16)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:<index> (default: cuda if available)")
    return parser


def user_error(e: BaseException) -> str | None:
    """The one line for an error a user can fix (bad input, a path, a busy or failed run); None for a bug."""
    from lordo.launch import LaunchError
    from lordo.runs import RunInUse
    if isinstance(e, OSError) and e.filename is not None:
        return f"{e.filename}: {e.strerror or e}"
    if isinstance(e, ValueError | OSError | ConnectionError | LaunchError | RunInUse):
        return str(e).splitlines()[0] if str(e) else type(e).__name__
    if isinstance(e, RuntimeError) and re.search(r"out of memory|can't allocate memory", str(e), re.I):
        return (f"out of memory: {_memory_line(str(e))}; a smaller --batch-size (with --grad-accum for the same "
                "tokens per step), --seq-len or --preset needs less")
    return None


def _memory_line(message: str) -> str:
    """The line of an allocator's error that says what it tried to allocate."""
    line = next((ln for ln in message.splitlines() if re.search(r"allocate", ln)), message.splitlines()[0])
    return re.sub(r"^\[enforce fail at [^]]*\] (err == 0\. )?", "", line).strip()


MODULES = {"train": "lordo.launch", "prepare": "lordo.data", "export": "lordo.evaluate", "eval": "lordo.evaluate"}
_signalled: list[int] = []   # SIGTERM/SIGINT received: an interrupt that library code swallowed still counts


def _interrupt(signum: int, frame: object) -> None:
    _signalled.append(signum)
    raise KeyboardInterrupt


def _start(command: str | None, argv: list[str]) -> argparse.Namespace:
    """Parse and import what the command runs, with SIGTERM and SIGINT held until the imports are done: an
    exception raised inside a library's import can be swallowed there (numpy's and torch's can), and would
    leave the command running on."""
    import importlib

    held: list[int] = []
    hold = lambda signum, frame: held.append(signum)
    previous = {sig: signal.signal(sig, hold) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        args = build_parser(train_options=command == "train").parse_args(argv)
        importlib.import_module(MODULES[args.command])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if held:
        raise KeyboardInterrupt
    return args


def main(argv: list[str] | None = None) -> None:
    # SIGTERM (`kill`, a scheduler) stops every command as Ctrl-C does, from its first line to its last: 130
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if in_main else None
    if argv is None:   # the `lordo` command: once it is done, SIGTERM during the interpreter's exit is 130 too
        previous, argv = (lambda signum, frame: os._exit(INTERRUPTED)), sys.argv[1:]
    command = argv[0] if argv and argv[0] in MODULES else None
    _signalled.clear()
    try:
        args = _start(command, argv) if in_main else build_parser(command == "train").parse_args(argv)
        {"train": _train, "prepare": _prepare, "export": _export, "eval": _eval}[args.command](args)
        if _signalled:
            raise KeyboardInterrupt
    except KeyboardInterrupt as e:
        print(f"lordo{f' {command}' if command else ''}: {str(e) or 'interrupted'}", file=sys.stderr)
        sys.exit(INTERRUPTED)
    except Exception as e:
        message = user_error(e)
        if message is None:
            raise
        print(f"lordo {command}: error: {message}", file=sys.stderr)
        sys.exit(USAGE_ERROR)
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    main()
