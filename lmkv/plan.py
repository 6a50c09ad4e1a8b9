"""The chunk plan of a token sequence: every chunk's span, storage key and token fingerprint, hashed once.

One request is one pass: :meth:`lmkv.token_db.TokenDatabase.plan` hashes a sequence once, and lookup, store and
retrieve of that sequence all read the same plan. Keys are computed up front (a lookup needs nothing else);
fingerprints (SHA-256 of every token from 0 through a chunk's end, checked on every hit) on first use, since a
lookup that misses never needs them.

Plain data, no hashing here: the reference storage model and the tiers import this module too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Chunk:
    """Tokens ``[start, end)`` of a sequence, stored under ``key`` with ``fingerprint`` of the tokens its KV
    depends on (a prefix chunk: tokens ``[0, end)``; a position-free segment: its own tokens)."""

    start: int
    end: int
    key: str
    fingerprint: bytes

    @property
    def num_tokens(self) -> int:
        return self.end - self.start


class ChunkPlan:
    """The prefix-chained chunks of one token sequence.

    Args:
        tokens: the sequence (list of ints).
        spans: ``[(start, end)]`` of every keyed chunk, in order (the last may be partial).
        keys: storage key of each span.
        fingerprints: ``fn(ends) -> [fingerprint]`` computing the fingerprints of the chunks ending at ``ends``
            in one pass; called at most once per plan.
    """

    def __init__(self, tokens: list[int], spans: Sequence[tuple[int, int]], keys: Sequence[str],
                 fingerprints: Callable[[list[int]], list[bytes]]) -> None:
        if len(spans) != len(keys):
            raise ValueError(f"{len(spans)} spans but {len(keys)} keys")
        self.tokens = tokens
        self.spans = list(spans)
        self.keys = list(keys)
        self._fingerprint_fn = fingerprints
        self._fingerprints: list[bytes] | None = None

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def fingerprints(self) -> list[bytes]:
        if self._fingerprints is None:
            self._fingerprints = list(self._fingerprint_fn([e for _, e in self.spans]))
        return self._fingerprints

    def count_within(self, end: int) -> int:
        """How many leading chunks end at or before token ``end``."""
        n = 0
        for _, e in self.spans:
            if e > end:
                break
            n += 1
        return n

    def chunks(self, end: int | None = None) -> list[Chunk]:
        """The chunks ending at or before ``end`` (all by default), with their fingerprints."""
        n = len(self.spans) if end is None else self.count_within(end)
        fps = self.fingerprints if n else []
        return [Chunk(s, e, k, fp) for (s, e), k, fp in zip(self.spans[:n], self.keys[:n], fps)]

    def end_of(self, num_chunks: int) -> int:
        """Tokens covered by the first ``num_chunks`` chunks."""
        return self.spans[num_chunks - 1][1] if num_chunks > 0 else 0


def leading_hits(flags: Iterable[bool]) -> int:
    """How many of ``flags``, from the first, are true: a prefix lookup's answer. The one place this is counted."""
    n = 0
    for f in flags:
        if not f:
            break
        n += 1
    return n
