"""Export and lm-eval evaluation of a briefly trained `nano` model on Shakespeare (offline)."""

import csv
import json
import math
import shutil
from dataclasses import asdict, replace

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

import lordo
from lordo.evaluate import (
    CORE_TASKS,
    chunk_documents,
    corpus_text,
    evaluate_run,
    export_hf,
    hf_lm,
    load_model,
    run_perplexity,
)
from lordo.model import GPT, PRESETS, model_config

SEQ_LEN = 128


def make_run(run_dir, model, data):
    """A run directory as the trainer writes it."""
    run_dir.mkdir(parents=True)
    torch.save(model.state_dict(), run_dir / "model.pt")
    shutil.copyfile(data.tokenizer_path, run_dir / "tokenizer.json")
    (run_dir / "config.json").write_text(json.dumps({"model": asdict(model.config), "data": {
        "corpus": "shakespeare", "tokenizer": "bpe", "tokenizer_path": str(data.tokenizer_path)}}))
    (run_dir / "summary.json").write_text(json.dumps({"val_loss": 5.0, "val_ppl": math.exp(5.0)}))
    return run_dir


@pytest.fixture(scope="module")
def run(tmp_path_factory, shakespeare):
    """A nano model trained by the trainer for a few steps, so its predictions are far from uniform (an
    off-by-one token or a wrong context boundary changes the scores)."""
    trained = lordo.train(method="lordo", preset="nano", workers=2, steps=30, batch_size=8, seq_len=SEQ_LEN,
                          lr=1e-2, rank=4, sync_every=5, eval_batches=2, progress=False,
                          runs_dir=str(tmp_path_factory.mktemp("runs")))
    assert trained.summary["val_loss"] < 7.5  # uniform is ln(8192) = 9.0
    return trained.dir


@pytest.fixture(scope="module")
def lm(run):
    return hf_lm(export_hf(run), batch_size=4, device="cpu", max_length=SEQ_LEN)


@pytest.fixture(scope="module")
def tokenizer(run):
    return Tokenizer.from_file(str(run / "tokenizer.json"))


def test_export_carries_the_model_maximum_length(run, tmp_path):
    """Not the training sequence length: lm-eval would truncate longer documents to it."""
    from transformers import AutoConfig, AutoTokenizer

    out = export_hf(run, tmp_path / "hf")
    assert SEQ_LEN < PRESETS["nano"]["max_seq_len"]
    assert AutoConfig.from_pretrained(out).max_position_embeddings == PRESETS["nano"]["max_seq_len"]
    assert AutoTokenizer.from_pretrained(out).model_max_length == PRESETS["nano"]["max_seq_len"]


def test_export_logits_match(run, tmp_path, shakespeare):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # a second model with non-default rotary base and norm epsilon, to check they are carried over
    other = GPT(replace(model_config("nano", max_seq_len=SEQ_LEN), rope_theta=5e5, norm_eps=1e-6), seed=1)
    for run_dir in (run, make_run(tmp_path / "other", other, shakespeare)):
        out = export_hf(run_dir, tmp_path / f"{run_dir.name}-hf")
        assert (out / "model.safetensors").is_file()
        hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        hf_tokenizer = AutoTokenizer.from_pretrained(out)
        assert hf.config.tie_word_embeddings
        assert hf_tokenizer.eos_token == hf_tokenizer.bos_token == "<|endoftext|>"
        model = load_model(run_dir)
        generator = torch.Generator().manual_seed(0)
        idx = torch.randint(0, model.config.vocab_size, (2, SEQ_LEN), generator=generator)
        with torch.no_grad():
            diff = (hf(idx).logits - model(idx)[0]).abs().max().item()
        assert diff < 1e-5


def direct_loglikelihood(model, tokenizer, context, continuation):
    """log p(continuation | context) and whether it is the greedy continuation, from the project model, with
    lm-eval's conventions: the context's trailing whitespace goes with the continuation (a BPE token carries
    the space before a word), and an empty context is <|endoftext|>."""
    if context:
        n_spaces = len(context) - len(context.rstrip())
        ids = tokenizer.encode(context + continuation).ids
        n_context = len(tokenizer.encode(context[:len(context) - n_spaces]).ids)
    else:
        ids = [tokenizer.token_to_id("<|endoftext|>")] + tokenizer.encode(continuation).ids
        n_context = 1
    ids = torch.tensor(ids)
    with torch.no_grad():
        logprobs = model(ids[None, :-1])[0][0, n_context - 1:].log_softmax(-1)
    targets = ids[n_context:]
    return logprobs.gather(-1, targets[:, None]).sum().item(), bool((logprobs.argmax(-1) == targets).all())


def test_loglikelihood_matches_project_model(run, lm, tokenizer):
    from lm_eval.api.instance import Instance

    pairs = [("To be, or not to be,", " that is the question"), ("ROMEO.\n", "But soft, what light"),
             ("My lord, ", "the king is dead."), ("", "Friends, Romans, countrymen")]
    requests = [Instance(request_type="loglikelihood", doc={}, arguments=pair, idx=i)
                for i, pair in enumerate(pairs)]
    scored = lm.loglikelihood(requests)
    model = load_model(run)
    for (context, continuation), (logprob, greedy) in zip(pairs, scored):
        expected, expected_greedy = direct_loglikelihood(model, tokenizer, context, continuation)
        assert logprob == pytest.approx(expected, abs=1e-4), (context, continuation)
        assert greedy == expected_greedy


def direct_perplexity(model, tokenizer, documents):
    """exp(mean token cross-entropy) of the GPT on the windows [<|endoftext|>] + chunk[:-1] -> chunk."""
    eot = tokenizer.token_to_id("<|endoftext|>")
    nll, count = 0.0, 0
    for doc in documents:
        ids = torch.tensor(tokenizer.encode(doc).ids)
        with torch.no_grad():
            logits = model(torch.cat([torch.tensor([eot]), ids[:-1]])[None])[0][0]
        nll += F.cross_entropy(logits, ids, reduction="sum").item()
        count += len(ids)
    return math.exp(nll / count), count


def test_perplexity_matches_project_model(run, lm, tokenizer):
    results = run_perplexity(run, "heldout,ptb", limit=6, lm=lm)
    model = load_model(run)
    for corpus, name in [("heldout", "shakespeare"), ("ptb", "ptb")]:
        text, split = corpus_text(name, "bpe", 8192, heldout=corpus == "heldout")
        assert results[corpus]["split"] == split
        docs = chunk_documents(text, tokenizer, SEQ_LEN, limit=6)
        # the documents cover the text's first tokens exactly, each within one window
        chunks = [tokenizer.encode(d).ids for d in docs]
        assert all(len(c) <= SEQ_LEN for c in chunks)
        assert sum(chunks, []) == tokenizer.encode(text).ids[:sum(map(len, chunks))]
        ppl, tokens = direct_perplexity(model, tokenizer, docs)
        assert results[corpus]["tokens"] == tokens
        assert results[corpus]["ppl"] == pytest.approx(ppl, rel=1e-5)
    assert json.loads((run / "summary.json").read_text())["perplexity"]["ptb"]["ppl"] == results["ptb"]["ppl"]


def test_core_suite(run):
    val_loss = json.loads((run / "summary.json").read_text())["val_loss"]
    results = evaluate_run(run, tasks="core", limit=4, batch_size=8, device="cpu", perplexity_corpora="")
    assert set(results["downstream"]) == set(CORE_TASKS)
    for task, metrics in results["downstream"].items():
        assert metrics["n"] == 4
        assert metrics["split"] == ("test" if task == "lambada_openai" else "validation")
        for name in ("acc", "acc_norm"):
            if name in metrics:
                assert 0 <= metrics[name] <= 1 and metrics[f"{name}_stderr"] >= 0
    assert "acc_norm" in results["downstream"]["hellaswag"]
    assert "acc_norm" not in results["downstream"]["boolq"]
    speed = results["downstream_speed"]
    assert speed["loglikelihood_requests"] > 4 * len(CORE_TASKS) and speed["requests_per_s"] > 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["val_loss"] == val_loss and summary["downstream"] == results["downstream"]  # merged, kept
    with open(run / "downstream.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["task"] for r in rows) == sorted(CORE_TASKS)


def test_unknown_task_names_it(run):
    with pytest.raises(ValueError, match="not_a_task"):
        evaluate_run(run, tasks="core,not_a_task", perplexity_corpora="")


def test_missing_checkpoint_names_the_file(run, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(run, broken, ignore=shutil.ignore_patterns("model.pt", "hf"))
    for call in (lambda: export_hf(broken), lambda: evaluate_run(broken, perplexity_corpora="")):
        with pytest.raises(FileNotFoundError, match="model.pt"):
            call()
