"""Batches: each worker's training batches and its share of the validation windows, from the token files."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch


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

    def __iter__(self) -> Batches:
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
