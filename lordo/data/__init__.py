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

from __future__ import annotations

from lordo.data.batches import Batches, val_windows
from lordo.data.cache import FORMAT, Prepared, default_cache_dir, prepare
from lordo.data.corpora import CORPORA, OFFLINE_HINT, PIP_DOWNLOAD, Corpus, Request, Stream
from lordo.data.tokenization import EOT

__all__ = ["Batches", "CORPORA", "Corpus", "EOT", "FORMAT", "OFFLINE_HINT", "PIP_DOWNLOAD", "Prepared", "Request",
           "Stream", "default_cache_dir", "prepare", "val_windows"]
