"""The prepared cache: a corpus tokenized once into token files, verified, shared by concurrent callers."""

from __future__ import annotations

import fcntl
import hashlib
import itertools
import json
import os
import re
import shutil
import tempfile
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer
from tqdm import tqdm

from lordo.data import corpora
from lordo.data.corpora import (
    Corpus,
    Request,
    Stream,
    log,
    lookup_corpus,
    matching_files,
)
from lordo.data.tokenization import check_tokenizer, make_tokenizer
from lordo.files import sha256_file
from lordo.paths import REPO, in_checkout

FORMAT = 1  # bump when the cache layout changes, so old caches are rebuilt


def default_cache_dir() -> Path:
    """$LORDO_DATA_DIR; else data/cache/ of the checkout lordo runs from; else (an installed package, whose
    directory is no place for data) the user cache, $XDG_CACHE_HOME/lordo/data or ~/.cache/lordo/data."""
    if os.environ.get("LORDO_DATA_DIR"):
        return Path(os.environ["LORDO_DATA_DIR"])
    if in_checkout():
        return REPO / "data" / "cache"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lordo" / "data"


@dataclass
class Prepared:
    dir: Path
    manifest: dict
    train: np.memmap
    val: np.memmap
    test: np.memmap | None  # only corpora with an official test split (ptb)
    tokenizer: Tokenizer

    @property
    def tokenizer_path(self) -> Path:
        return self.dir / "tokenizer.json"

    @property
    def vocab_size(self) -> int:
        return self.manifest["tokenizer"]["vocab_size"]

    @property
    def eot_id(self) -> int:
        return self.manifest["tokenizer"]["eot_id"]

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self.tokenizer.decode(np.asarray(ids).tolist(), skip_special_tokens=False)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "_", text).strip("_")[:48]


def _load(directory: Path, verify: bool) -> Prepared | None:
    """The cache at `directory` if its manifest is there and every file matches it, else None."""
    try:
        manifest = json.loads((directory / "manifest.json").read_text())
        if manifest["format"] != FORMAT:
            return None
        for name, expected in manifest["files"].items():
            path = directory / name
            if path.stat().st_size != expected["bytes"] or (verify and sha256_file(path) != expected["sha256"]):
                return None
        # a files: corpus edited in place (its size and file times kept): stale, told by content
        if verify and any(sha256_file(Path(p)) != h for p, h in manifest.get("sources", {}).items()):
            return None
        dtype = np.dtype(manifest["dtype"])
        splits = {s: np.memmap(directory / f"{s}.bin", dtype=dtype, mode="r") for s in manifest["splits"]}
        tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return Prepared(directory, manifest, splits["train"], splits["val"], splits.get("test"), tokenizer)


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"waiting for another process to finish {path.stem}")
            fcntl.flock(f, fcntl.LOCK_EX)
        yield  # closing the file releases the lock


def _clean(doc: str) -> str:
    return doc.replace("\r\n", "\n").replace("\r", "\n").strip()


def _split_order(n_docs: int, val_fraction: float, seed: int) -> tuple[np.ndarray, int]:
    """A seeded permutation of the documents; its first n_val entries are the validation documents."""
    if n_docs < 2:
        raise ValueError(f"the corpus has {n_docs} document(s); splitting by document needs at least 2")
    return np.random.default_rng(seed).permutation(n_docs), min(n_docs - 1, max(1, round(n_docs * val_fraction)))


def _val_draws(val_fraction: float, seed: int) -> Iterator[bool]:
    """An endless seeded coin per document, True (validation) with probability val_fraction; drawn in blocks."""
    for block in itertools.count():
        yield from np.random.default_rng([seed, block]).random(1 << 16) < val_fraction


def _labelled(loaded: list[str] | dict[str, list[str]] | Stream,
              spec: dict) -> Callable[[], Iterator[tuple[str, str]]]:
    """A function that gives the corpus as (split, document) pairs, afresh on each call.

    In-memory corpora are split exactly by a seeded permutation and give validation (and test) documents first,
    then training documents in permuted order. Streams keep their own order: local files are counted first so
    that the same exact split applies; an hf: stream, of unknown length, sends each document to validation by
    a seeded draw. In a stream, max_docs counts documents as read, empty ones included.
    """
    max_docs, val_fraction, seed = spec["max_docs"], spec["val_fraction"], spec["seed"]
    if isinstance(loaded, dict):  # official splits; max_docs trims the training side only
        splits = {name: [d for d in map(_clean, docs) if d] for name, docs in loaded.items()}
        splits["train"] = splits["train"][:max_docs]
        names = sorted(splits, key=lambda name: name == "train")  # train last: max_tokens may cut it short
        return lambda: ((name, doc) for name in names for doc in splits[name])
    if isinstance(loaded, list):
        docs = [d for d in map(_clean, loaded) if d][:max_docs]
        order, n_val = _split_order(len(docs), val_fraction, seed)
        return lambda: itertools.chain((("val", docs[i]) for i in sorted(order[:n_val])),
                                       (("train", docs[i]) for i in order[n_val:]))
    if loaded.countable:  # a first pass to count: a few bytes of memory per document, never the text
        order, n_val = _split_order(sum(1 for _ in itertools.islice(loaded.open(), max_docs)), val_fraction, seed)
        is_val = np.zeros(len(order), dtype=bool)
        is_val[order[:n_val]] = True
        draws = lambda: iter(is_val)
    else:
        draws = lambda: _val_draws(val_fraction, seed)

    def pairs() -> Iterator[tuple[str, str]]:
        for val, doc in zip(draws(), itertools.islice(loaded.open(), max_docs)):
            if doc := _clean(doc):
                yield "val" if val else "train", doc

    return pairs


def _write_tokens(out: Path, pairs: Iterator[tuple[str, str]], tok: Tokenizer, eot_id: int, dtype: np.dtype,
                  max_tokens: int | None) -> tuple[dict[str, dict], dict[str, dict]]:
    """Tokenize (split, document) pairs batch by batch, appending each document and the end-of-text token to
    out/<split>.bin; stop once train holds max_tokens. Returns docs and tokens per split, and bytes and sha256
    per file: the files are hashed as they are written, so the build never reads them back."""
    stats = defaultdict(lambda: {"docs": 0, "tokens": 0})
    sinks = {}  # split -> (open file, running sha256)
    with ExitStack() as files, tqdm(total=max_tokens, desc="tokenizing", unit=" train tokens", unit_scale=True,
                                    disable=None) as bar:
        while batch := list(itertools.islice(pairs, corpora.DOCS_PER_BATCH)):
            encodings = tok.encode_batch_fast([doc for _, doc in batch], add_special_tokens=False)
            new = defaultdict(list)
            for (split, _), encoding in zip(batch, encodings):
                # Validation stops growing at VAL_MAX_TOKENS (a huge stream would make it needlessly large);
                # its later documents train instead, which keeps the two disjoint.
                if split == "val" and stats["val"]["tokens"] >= corpora.VAL_MAX_TOKENS:
                    split = "train"
                ids = encoding.ids  # a new list on each access
                ids.append(eot_id)
                if split == "train" and max_tokens:
                    ids = ids[:max_tokens - stats["train"]["tokens"]]
                new[split] += ids
                stats[split]["docs"] += 1
                stats[split]["tokens"] += len(ids)
                if stats["train"]["tokens"] == max_tokens:
                    break
            for split, ids in new.items():
                if split not in sinks:
                    sinks[split] = files.enter_context(open(out / f"{split}.bin", "wb")), hashlib.sha256()
                data = np.array(ids, dtype=dtype).tobytes()
                sinks[split][0].write(data)
                sinks[split][1].update(data)
            bar.update(len(new["train"]))
            if stats["train"]["tokens"] == max_tokens:
                break
    if empty := [split for split in ("train", "val") if not stats[split]["docs"]]:
        raise ValueError(f"the {' and '.join(empty)} split got no documents; use more data (max_docs, "
                         "max_tokens) or a different val_fraction")
    names = [split for split in ("train", "val", "test") if split in sinks]
    return ({split: stats[split] for split in names},
            {f"{split}.bin": {"bytes": (out / f"{split}.bin").stat().st_size, "sha256": sinks[split][1].hexdigest()}
             for split in names})


def _build(out: Path, corpus: Corpus, req: Request, spec: dict) -> None:
    pairs = _labelled(corpus.load(req), spec)
    # The generator is only an argument, so it is closed (and a stream's first pass released) on return.
    tok, eot = make_tokenizer(spec["tokenizer"], spec.get("vocab_size", 0),
                              (doc for split, doc in pairs() if split == "train"), req.cache)
    tok.save(str(out / "tokenizer.json"))
    vocab_size, eot_id = tok.get_vocab_size(), tok.token_to_id(eot)
    dtype = np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)
    counts, token_files = _write_tokens(out, pairs(), tok, eot_id, dtype, spec["max_tokens"])
    tokenizer_file = {"bytes": (out / "tokenizer.json").stat().st_size, "sha256": sha256_file(out / "tokenizer.json")}
    manifest = {
        "format": FORMAT,
        "corpus": spec["corpus"], "source": corpus.source, "licence": corpus.licence,
        "spec": spec,
        "tokenizer": {"kind": spec["tokenizer"], "vocab_size": vocab_size, "eot_token": eot,
                      "eot_id": eot_id},
        "dtype": dtype.name,
        "splits": counts,
        "files": {"tokenizer.json": tokenizer_file, **token_files},
        "sources": {path: sha256_file(Path(path)) for path, *_ in spec.get("files", [])},
    }
    # Written last: its presence marks the build complete.
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")


def prepare(corpus: str = "shakespeare", tokenizer: str = "bpe", vocab_size: int = 8192,
            cache_dir: str | Path | None = None, val_fraction: float = 0.1, seed: int = 0,
            max_docs: int | None = None, max_tokens: int | None = None, text_field: str = "text",
            verify: bool = True) -> Prepared:
    """Fetch, split (by document), tokenize and cache `corpus`; later calls only verify the cache.

    tokenizer: "bpe" (byte-level BPE of vocab_size entries trained on the train split), "gpt2", or a Hugging
    Face tokenizer name. val_fraction and seed choose the validation documents (corpora with an official
    split keep it); for hf: corpora each document is validation with probability val_fraction, and validation
    stops growing at VAL_MAX_TOKENS. max_docs reads at most that many documents; max_tokens keeps at most that
    many training tokens, and a streamed (hf:, files:) corpus is read only until train has them. text_field is
    the text column of hf: and .jsonl data. verify=False checks file sizes instead of sha256, for very large
    caches.
    """
    entry, arg = lookup_corpus(corpus)
    check_tokenizer(tokenizer, vocab_size)
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction={val_fraction!r} must be between 0 and 1 (exclusive)")
    for name, value in [("max_docs", max_docs), ("max_tokens", max_tokens)]:
        if value is not None and not (isinstance(value, int) and value > 0):
            raise ValueError(f"{name}={value!r} must be a positive int or None")
    if corpus.startswith("hf:") and max_docs is None and max_tokens is None:
        raise ValueError(f"{corpus} is streamed: pass max_docs or max_tokens to say how much of it to take")

    spec = {"format": FORMAT, "corpus": corpus, "tokenizer": tokenizer, "val_fraction": val_fraction,
            "seed": seed, "max_docs": max_docs, "max_tokens": max_tokens, "text_field": text_field}
    if tokenizer == "bpe":
        spec["vocab_size"] = vocab_size
    if corpus.startswith("files:"):  # the files' identity, so editing them makes a new cache
        spec["files"] = [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in matching_files(arg)]
    if corpus.startswith(("hf:", "files:")):  # they shape a streamed corpus' split and tokenizer
        spec["stream"] = {"val_max_tokens": corpora.VAL_MAX_TOKENS, "bpe_train_docs": corpora.BPE_TRAIN_DOCS}
    cache = Path(cache_dir or default_cache_dir()).expanduser().resolve()
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:10]
    directory = cache / f"{_slug(corpus)}-{_slug(tokenizer)}-{digest}"
    if data := _load(directory, verify):
        return data

    cache.mkdir(parents=True, exist_ok=True)
    with _locked(cache / f"{directory.name}.lock"):
        if data := _load(directory, verify):  # another process finished it while we waited
            return data
        for stale in [directory, *cache.glob(f".{directory.name}-*")]:  # a corrupt cache, killed builds
            if stale.exists():
                log(f"removing incomplete or corrupt {stale}")
                shutil.rmtree(stale)
        tmp = Path(tempfile.mkdtemp(dir=cache, prefix=f".{directory.name}-"))
        try:
            _build(tmp, entry, Request(arg, cache, text_field), spec)
            os.replace(tmp, directory)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if data := _load(directory, verify=False):  # the build hashed every file as it wrote it
        log(f"prepared {directory}: {len(data.train):,} train / {len(data.val):,} validation tokens")
        return data
    raise RuntimeError(f"{directory} does not load right after it was built")
