"""Eviction policies: O(1) insert/touch/remove and victims in eviction order.

A policy only orders keys; the tier decides how many victims it needs (bytes) and may skip pinned ones, which
is why :meth:`victims` is an iterator rather than a single pop.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator


class LRUPolicy:
    """Least recently used first; ``touch`` on every hit."""

    name = "lru"

    def __init__(self) -> None:
        self._order: OrderedDict[str, None] = OrderedDict()

    def insert(self, key: str) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def touch(self, key: str) -> None:
        if key in self._order:
            self._order.move_to_end(key)

    def remove(self, key: str) -> None:
        self._order.pop(key, None)

    def victims(self) -> Iterator[str]:
        """Keys in eviction order. The caller may remove the yielded key before asking for the next one;
        each step rescans from the head past the keys already yielded (the pinned ones it skipped)."""
        yielded: set[str] = set()
        while True:
            for k in self._order:
                if k not in yielded:
                    break
            else:
                return
            yielded.add(k)
            yield k

    def __len__(self) -> int:
        return len(self._order)


class FIFOPolicy(LRUPolicy):
    """First inserted first; hits do not reorder."""

    name = "fifo"

    def touch(self, key: str) -> None:
        return None


POLICIES = {"lru": LRUPolicy, "fifo": FIFOPolicy}


def make_policy(name: str) -> LRUPolicy:
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(f"policy must be one of {sorted(POLICIES)}, got {name!r}") from None
