"""Tests for lordo.data: corpora, cache, tokenizers, per-worker batches.

The real corpora are prepared once into the default cache (data/cache/) and reused by later runs; everything
else uses small `files:` corpora and local or generated `hf:` datasets under tmp_path.
"""

import itertools
import json
import multiprocessing
import os
import subprocess
import sys
import textwrap
import time
import tracemalloc

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before anything imports huggingface_hub, which reads it once
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import lordo.data  # noqa: E402
import lordo.data.corpora  # noqa: E402
import lordo.paths  # noqa: E402
from lordo.data import CORPORA, Batches, default_cache_dir, prepare, val_windows  # noqa: E402

SAMPLES = ["To be, or not to be: that is the question.", "  Ünïcödé — 😀 tabs\tand\r\nnewlines\n",
           "a<|endoftext|>b", ""]


def write_corpus(root, n_txt=6, n_jsonl=4):
    """n_txt .txt documents and one .jsonl of n_jsonl documents, each text unique."""
    root.mkdir(parents=True, exist_ok=True)
    docs = [f"Document {i}. " + " ".join(f"word{(i * 7 + j) % 50}" for j in range(40))
            for i in range(n_txt + n_jsonl)]
    for i, doc in enumerate(docs[:n_txt]):
        (root / f"doc{i}.txt").write_text(doc)
    with open(root / "more.jsonl", "w") as f:
        f.writelines(json.dumps({"text": doc, "id": i}) + "\n" for i, doc in enumerate(docs[n_txt:]))
    return docs


def documents(data, tokens):
    return set(data.decode(tokens).split("<|endoftext|>")) - {""}


@pytest.fixture
def small(tmp_path):
    """A small files: corpus and a cache dir that shares raw downloads with the default cache."""
    docs = write_corpus(tmp_path / "corpus")
    (default_cache_dir() / "raw").mkdir(parents=True, exist_ok=True)
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "raw").symlink_to(default_cache_dir() / "raw")
    return {"corpus": f"files:{tmp_path / 'corpus'}/*", "cache_dir": tmp_path / "cache", "docs": docs}


def test_shakespeare_bpe():
    data = prepare("shakespeare")
    splits = data.manifest["splits"]
    assert data.vocab_size == 8192 and data.train.dtype == np.uint16
    assert "public domain" in data.manifest["licence"]
    assert len(data.train) > 1_000_000 and len(data.val) > 50_000
    assert splits["train"]["docs"] + splits["val"]["docs"] == 42
    assert data.val[-1] == data.eot_id and (data.val == data.eot_id).sum() == splits["val"]["docs"]
    for text in SAMPLES:
        assert data.decode(data.encode(text)) == text
    start = time.perf_counter()
    again = prepare("shakespeare")  # only verifies the cache
    assert again.dir == data.dir and time.perf_counter() - start < 5

    from transformers import PreTrainedTokenizerFast
    hf = PreTrainedTokenizerFast(tokenizer_file=str(data.tokenizer_path))
    assert hf(SAMPLES[0])["input_ids"] == data.encode(SAMPLES[0])


def test_gpt2_tokenizer(small):
    data = prepare(small["corpus"], tokenizer="gpt2", cache_dir=small["cache_dir"])
    assert data.vocab_size == 50257 and data.eot_id == 50256 and data.train.dtype == np.uint16
    assert data.encode("Hello, world!") == [15496, 11, 995, 0]  # GPT-2's own ids
    for text in SAMPLES:
        assert data.decode(data.encode(text)) == text
    assert documents(data, data.train) | documents(data, data.val) == set(small["docs"])

    # The same tokenizer as a Hugging Face tokenizer directory goes through AutoTokenizer, with equal tokens.
    from transformers import PreTrainedTokenizerFast
    local = small["cache_dir"].parent / "local_tokenizer"
    PreTrainedTokenizerFast(tokenizer_file=str(data.tokenizer_path), eos_token="<|endoftext|>").save_pretrained(local)
    via_hf = prepare(small["corpus"], tokenizer=str(local), cache_dir=small["cache_dir"])
    assert np.array_equal(via_hf.train, data.train) and via_hf.eot_id == 50256


def test_files_split_by_document_and_cache(small):
    def prep(seed=1):
        return prepare(small["corpus"], vocab_size=300, val_fraction=0.3, seed=seed,
                       cache_dir=small["cache_dir"])

    data = prep()
    train, val = documents(data, data.train), documents(data, data.val)
    assert not train & val and train | val == set(small["docs"])  # .txt and .jsonl documents, split whole
    assert len(val) == 3 and data.manifest["splits"]["val"]["docs"] == 3
    other = prep(seed=2)
    assert other.dir != data.dir and documents(other, other.val) != val

    # Idempotent: the second call returns the same files without rebuilding them.
    built = (data.dir / "train.bin").stat().st_mtime_ns
    assert prep().dir == data.dir
    assert (data.dir / "train.bin").stat().st_mtime_ns == built

    # A corrupted token file (same size, wrong checksum) and a missing manifest are both rebuilt.
    train_bytes = (data.dir / "train.bin").read_bytes()
    with open(data.dir / "train.bin", "r+b") as f:
        f.write(bytes([train_bytes[0] ^ 1]))
    rebuilt = prep()
    assert (rebuilt.dir / "train.bin").read_bytes() == train_bytes
    (data.dir / "manifest.json").unlink()
    (small["cache_dir"] / f".{data.dir.name}-killed").mkdir()  # what a build killed half-way leaves
    rebuilt = prep()
    assert rebuilt.manifest == data.manifest and not list(small["cache_dir"].glob(f".{data.dir.name}-*"))


def pieces(data, tokens):
    """The indices of the whole documents ("doc<i>: ...") in `tokens`, in order, and the cut-off text after them."""
    *whole, tail = data.decode(tokens).split("<|endoftext|>")
    return [int(doc.split(":")[0][3:]) for doc in whole], tail


def test_hf_stream_split(tmp_path, monkeypatch):
    """hf: on a local parquet dataset is read in order until train holds max_tokens, and split by document."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    texts = [f"doc{i}: " + " ".join(f"w{(i * 7 + j) % 50}" for j in range(3 + i % 11)) for i in range(3000)]
    (tmp_path / "ds").mkdir()
    for part in range(3):
        pq.write_table(pa.table({"text": texts[part * 1000:(part + 1) * 1000], "id": range(1000)}),
                       tmp_path / "ds" / f"part{part}.parquet")

    def prep(**options):
        return prepare(f"hf:{tmp_path / 'ds'}", vocab_size=300, cache_dir=tmp_path / "cache", **options)

    def split(data):
        """Train and validation document indices, checked to be a prefix of the dataset read in order."""
        (train, tail), (val, rest) = pieces(data, data.train), pieces(data, data.val)
        read = len(train) + len(val) + bool(tail)  # a training document cut off at max_tokens was read last
        assert rest == "" and texts[read - 1].startswith(tail)
        assert sorted(train + val + [read - 1] * bool(tail)) == list(range(read))  # each document once
        assert train == sorted(train) and val == sorted(val)
        assert data.manifest["splits"]["train"]["docs"] == len(train) + bool(tail)
        return train, val, tail

    data = prep(max_tokens=4000)
    train, val, tail = split(data)
    read = len(train) + len(val) + bool(tail)
    assert len(data.train) == 4000 == data.manifest["splits"]["train"]["tokens"]
    whole = (documents(data, data.train) - {tail}) | documents(data, data.val)
    assert whole <= set(texts) and len(whole) == len(train) + len(val)  # intact, but for the cut one
    assert 0.05 < len(val) / read < 0.2 and read < 1000  # ~val_fraction; only what max_tokens needs was read
    assert prep(max_tokens=4000).dir == data.dir
    other = prep(max_tokens=4000, seed=1)
    assert other.dir != data.dir and split(other)[1] != val  # another seed, other documents

    few = prep(max_docs=100)
    assert sum(s["docs"] for s in few.manifest["splits"].values()) == 100 == sum(map(len, split(few)[:2]))

    monkeypatch.setattr(lordo.data.corpora, "VAL_MAX_TOKENS", 60)  # validation full: later documents train instead
    capped = prep(max_tokens=4000)
    capped_train, capped_val, _ = split(capped)
    longest = max(len(capped.encode(text)) + 1 for text in texts)
    assert 60 <= len(capped.val) < 60 + longest and capped_val == val[:len(capped_val)]
    assert set(val[len(capped_val):]) & set(capped_train)
    with pytest.raises(ValueError, match="has no field 'body'"):
        prep(max_docs=10, text_field="body")


def test_hf_stream_memory_is_bounded(tmp_path, monkeypatch):
    """An endless hf: stream: prepare reads only what max_tokens needs, and its memory does not grow with it."""
    import datasets
    words, pulled = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima".split(), [0]

    def endless():
        for i in itertools.count():
            pulled[0] += 1
            yield {"text": f"doc{i}: " + " ".join(words[(i * j + j // 3) % len(words)] for j in range(300))}

    monkeypatch.setattr(datasets, "load_dataset", lambda *_, **__: datasets.IterableDataset.from_generator(endless))
    monkeypatch.setattr(lordo.data.corpora, "BPE_TRAIN_DOCS", 100)
    monkeypatch.setattr(lordo.data.corpora, "DOCS_PER_BATCH", 16)  # many batches even for a small test corpus

    def peak(max_tokens):
        pulled[0] = 0
        tracemalloc.start()
        data = prepare("hf:endless", vocab_size=1000, max_tokens=max_tokens, cache_dir=tmp_path / str(max_tokens))
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert len(data.train) == max_tokens
        # Read: the BPE pass (about 100 / 0.9 documents) and the documents written, plus a batch or two ahead.
        assert pulled[0] <= 100 / 0.8 + sum(s["docs"] for s in data.manifest["splits"].values()) + 4 * 16
        return peak, sum(len(data.decode(s)) for s in (data.train, data.val))

    peak(20_000)  # imports and first-use allocations
    small, _ = peak(100_000)
    large, text = peak(400_000)
    assert large < 1.25 * small and large < text  # a corpus held in memory would grow with it


def _prepare_in_child(corpus, cache_dir, barrier, results):
    barrier.wait()
    data = prepare(corpus, vocab_size=300, cache_dir=cache_dir)
    results.put((str(data.dir), data.manifest))


def test_concurrent_prepare(small):
    context = multiprocessing.get_context("fork")
    barrier, results = context.Barrier(2), context.Queue()
    args = (small["corpus"], small["cache_dir"], barrier, results)
    workers = [context.Process(target=_prepare_in_child, args=args) for _ in range(2)]
    for w in workers:
        w.start()
    outcomes = [results.get(timeout=120) for _ in workers]
    for w in workers:
        w.join(timeout=30)
        assert w.exitcode == 0
    assert outcomes[0] == outcomes[1]
    assert [p.name for p in small["cache_dir"].iterdir() if p.is_dir() and p.name != "raw"] == [
        os.path.basename(outcomes[0][0])]


def _epoch(tokens, rank, world_size, seed=0, seq_len=8, batch_size=4):
    batches = Batches(tokens, seq_len, batch_size, rank, world_size, seed)
    return [next(batches) for _ in range(len(batches))]


def _epoch_in_child(tokens, rank, results):
    results.put([x.numpy() for x, _ in _epoch(tokens, rank, 4)])


def test_batches_disjoint_deterministic():
    tokens = np.arange(4000, dtype=np.uint16)  # every token distinct: a window is known by its first token
    epochs = [_epoch(tokens, rank, 4) for rank in range(4)]
    seen = [{int(x[i, 0]) for x, _ in epoch for i in range(len(x))} for epoch in epochs]
    for r in range(4):
        for s in range(r + 1, 4):
            assert not seen[r] & seen[s]
    x, y = epochs[0][0]
    assert x.dtype == torch.long and x.shape == (4, 8) and torch.equal(y[:, :-1], x[:, 1:])
    assert torch.equal(y, x + 1) and sum(map(len, seen)) == len(epochs[0]) * 4 * 4
    assert [seen[0]] != [{int(x[i, 0]) for x, _ in _epoch(tokens, 0, 4, seed=1) for i in range(len(x))}]

    context = multiprocessing.get_context("fork")
    results = context.Queue()
    child = context.Process(target=_epoch_in_child, args=(tokens, 2, results))
    child.start()
    from_child = results.get(timeout=60)
    child.join(timeout=30)
    assert all(np.array_equal(a, x.numpy()) for a, (x, _) in zip(from_child, epochs[2], strict=True))


def test_batches_resume(tmp_path):
    tokens = np.arange(3000, dtype=np.uint32)
    reference = Batches(tokens, 16, 4, rank=1, world_size=2, seed=3)
    expected = [next(reference) for _ in range(3 * len(reference))]  # three epochs
    for stop in (1, len(reference), len(reference) + 5):
        batches = Batches(tokens, 16, 4, rank=1, world_size=2, seed=3)
        for _ in range(stop):
            next(batches)
        torch.save(batches.state_dict(), tmp_path / "state.pt")
        resumed = Batches(tokens, 16, 4, rank=1, world_size=2, seed=3)
        resumed.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
        for x, y in expected[stop:stop + 12]:
            rx, ry = next(resumed)
            assert torch.equal(rx, x) and torch.equal(ry, y)
    with pytest.raises(ValueError, match="seq_len=16 \\(now 8\\)"):
        Batches(tokens, 8, 4, rank=1, world_size=2, seed=3).load_state_dict(reference.state_dict())


def test_val_windows_cover_each_window_once():
    tokens = np.arange(1001, dtype=np.uint16)
    firsts = [x[:, 0] for rank in range(4) for x, _ in val_windows(tokens, 10, 3, rank, 4)]
    assert sorted(torch.cat(firsts).tolist()) == list(range(0, 1000, 10))
    x, y = next(val_windows(tokens, 10, 3))
    assert torch.equal(x[0], torch.arange(10)) and torch.equal(y[0], torch.arange(1, 11))
    capped = [x for r in range(4) for x, _ in val_windows(tokens, 10, 3, r, 4, max_batches=2)]
    assert len(capped) == 8 and sum(len(x) for x in capped) == 24
    with pytest.raises(ValueError, match="seq_len=2000 is larger than the validation split"):
        val_windows(tokens, 2000, 3)


def test_bad_input(small):
    with pytest.raises(ValueError, match="unknown corpus 'wikitext'.*'shakespeare', 'brown', 'ptb'"):
        prepare("wikitext")
    with pytest.raises(ValueError, match="unknown corpus 'hf:'"):
        prepare("hf:")
    with pytest.raises(ValueError, match="unknown tokenizer 'no such tokenizer!'.*'bpe', 'gpt2'"):
        prepare(small["corpus"], tokenizer="no such tokenizer!")
    with pytest.raises(ValueError, match="vocab_size=100 is too small.*at least 257"):
        prepare(small["corpus"], vocab_size=100)
    with pytest.raises(ValueError, match="val_fraction=1.5"):
        prepare(small["corpus"], val_fraction=1.5)
    with pytest.raises(ValueError, match="pass max_docs or max_tokens"):
        prepare("hf:HuggingFaceFW/fineweb-edu:sample-10BT")
    with pytest.raises(ValueError, match="matches no files"):
        prepare("files:/nonexistent/*.txt")
    with pytest.raises(ValueError, match="fewer than one global batch"):
        Batches(np.arange(100), seq_len=50, batch_size=2)
    with pytest.raises(ValueError, match="rank=4 must be"):
        Batches(np.arange(1000), seq_len=5, batch_size=2, rank=4, world_size=4)
    assert set(CORPORA) == {"shakespeare", "brown", "ptb", "hf:", "files:"}


@pytest.mark.integration
def test_hub_offline_message(small, tmp_path):
    """Offline, hf: corpora and hub tokenizers fail with one clear line; local datasets still load via hf:."""
    (tmp_path / "hf_data").mkdir()
    with open(tmp_path / "hf_data" / "part.jsonl", "w") as f:
        f.writelines(json.dumps({"text": doc}) + "\n" for doc in small["docs"])
    script = textwrap.dedent(f"""
        from lordo.data import prepare
        for corpus, tokenizer in [("hf:HuggingFaceFW/fineweb-edu:sample-10BT", "bpe"),
                                  ({small['corpus']!r}, "EleutherAI/pythia-160m")]:
            try:
                prepare(corpus, tokenizer, max_docs=10, cache_dir={str(small['cache_dir'])!r})
            except ConnectionError as err:
                print(str(err))
        local = prepare("hf:{tmp_path / 'hf_data'}", max_docs=5, vocab_size=300,
                        cache_dir={str(tmp_path / 'hf')!r})
        print("local", sum(local.manifest["splits"][s]["docs"] for s in ("train", "val")))
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.strip().splitlines()
    assert len(lines) == 3 and lines[2] == "local 5", run.stdout
    failing = ["hf:HuggingFaceFW/fineweb-edu:sample-10BT", "tokenizer 'EleutherAI/pythia-160m'"]
    for line, what in zip(lines, failing):
        assert line.startswith(f"{what} needs the Hugging Face Hub, and there is no network access to it")
        assert "'shakespeare', 'brown', 'ptb' or 'files:<glob>'" in line


@pytest.mark.integration
@pytest.mark.slow
def test_brown_and_ptb():
    brown = prepare("brown")
    assert sum(s["docs"] for s in brown.manifest["splits"].values()) == 500
    text = brown.decode(brown.val[:2000])
    assert "/nn" not in text and "``" not in text and " ." not in text

    ptb = prepare("ptb")
    splits = ptb.manifest["splits"]
    assert {k: v["docs"] for k, v in splits.items()} == {"train": 42068, "val": 3370, "test": 3761}
    assert ptb.test is not None and len(ptb.test) == splits["test"]["tokens"]
    assert "research" in ptb.manifest["licence"]
    assert ptb.decode(ptb.val[:200]).startswith("consumers may want to move their telephones")


def test_cache_outside_a_checkout_is_the_user_cache(monkeypatch, tmp_path):
    """An installed (non-editable) package keeps no data in site-packages; $LORDO_DATA_DIR wins everywhere."""
    monkeypatch.delenv("LORDO_DATA_DIR", raising=False)
    assert default_cache_dir() == lordo.paths.REPO / "data" / "cache"   # checkout
    monkeypatch.setattr(lordo.paths, "REPO", tmp_path / "site-packages")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "lordo" / "data"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "lordo" / "data"
    monkeypatch.setenv("LORDO_DATA_DIR", str(tmp_path / "mine"))
    assert default_cache_dir() == tmp_path / "mine"
