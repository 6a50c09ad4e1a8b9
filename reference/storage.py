"""Executable spec of tiered storage: a synchronous dict-of-bytes model of what ``TieredStore`` must do.

The model has no pool, no files, no threads and no header: each tier is an ordered dict ``key -> Item``
(the tensor's bytes, dtype, shape and token fingerprint) with a byte capacity. The observable behaviour it
pins down, and which the stateful test checks the real store against step by step:

* ``put(key, kv, fingerprint)`` writes through to every tier. In each tier an existing object under ``key``
  is replaced; then least recently used objects are evicted until the new one fits (``sum(size) <=
  capacity`` always holds); an object larger than the tier's capacity is not stored there (no error).
* ``get(key, fingerprint)`` asks the tiers hot to cold. The first tier holding ``key`` refreshes its recency.
  If a fingerprint is given and differs from the stored one, the result is a miss and nothing else changes.
  Otherwise the value is returned bit-exactly and promoted (a put) into every tier above the one that served
  it.
* ``contains`` is true when any tier holds the key; ``batched_contains(keys)`` counts leading keys held by some
  tier; ``remove`` deletes from every tier.
* ``restart()`` models a process restart: volatile tiers (memory) lose everything, persistent ones (disk,
  Redis) keep their objects.

Sizes per tier are given by a function of the item (the real memory tier counts 64-byte-aligned payloads, the
disk tier whole files), so capacities are compared in the same units as the implementation uses.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from lmkv.plan import leading_hits


@dataclass(frozen=True)
class Item:
    data: bytes  # the tensor's bytes, C order
    dtype: torch.dtype
    shape: tuple[int, ...]
    fingerprint: bytes

    @classmethod
    def of(cls, kv: torch.Tensor, fingerprint: bytes) -> Item:
        flat = kv.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        return cls(bytes(flat.numpy().tobytes()), kv.dtype, tuple(kv.shape), bytes(fingerprint))

    def tensor(self) -> torch.Tensor:
        if not self.data:
            return torch.empty(self.shape, dtype=self.dtype)
        return torch.frombuffer(bytearray(self.data), dtype=torch.uint8).view(self.dtype).reshape(self.shape)


@dataclass
class ModelTier:
    name: str
    capacity: int
    size: Callable[[str, Item], int]
    persistent: bool
    objects: OrderedDict[str, Item]

    def used(self) -> int:
        return sum(self.size(k, v) for k, v in self.objects.items())

    def put(self, key: str, item: Item) -> None:
        self.objects.pop(key, None)
        need = self.size(key, item)
        if need > self.capacity:
            return
        while self.used() + need > self.capacity:
            self.objects.popitem(last=False)  # least recently used first
        self.objects[key] = item

    def touch(self, key: str) -> None:
        self.objects.move_to_end(key)


class ReferenceStore:
    """``tiers``: ``(name, capacity_bytes, size_fn, persistent)`` hot to cold."""

    def __init__(self, tiers: Sequence[tuple[str, int, Callable[[str, Item], int], bool]]) -> None:
        self.tiers = [ModelTier(n, c, s, p, OrderedDict()) for n, c, s, p in tiers]

    def put(self, key: str, kv: torch.Tensor, *, fingerprint: bytes) -> None:
        item = Item.of(kv, fingerprint)
        for t in self.tiers:
            t.put(key, item)

    def get_with_tier(self, key: str, *, fingerprint: bytes | None = None) -> tuple[torch.Tensor | None, str | None]:
        for i, t in enumerate(self.tiers):
            item = t.objects.get(key)
            if item is None:
                continue
            t.touch(key)
            if fingerprint is not None and item.fingerprint != fingerprint:
                return None, None
            for upper in self.tiers[:i]:
                upper.put(key, item)
            return item.tensor(), t.name
        return None, None

    def get(self, key: str, *, fingerprint: bytes | None = None) -> torch.Tensor | None:
        return self.get_with_tier(key, fingerprint=fingerprint)[0]

    def batched_get(self, keys: Sequence[str], fingerprints: Sequence[bytes | None] | None = None
                    ) -> list[torch.Tensor | None]:
        return [kv for kv, _ in self.get_many(keys, fingerprints)]

    def get_many(self, keys: Sequence[str], fingerprints: Sequence[bytes | None] | None = None, *,
                 prefix: bool = False) -> list[tuple[torch.Tensor | None, str | None]]:
        """Three passes, as the real store's one-request-per-tier reads: first, tier by tier, which tier holds each
        key (a membership query, nothing touched); then, in key order, each key is read from that tier (touched)
        and checked against its fingerprint; last, in key order, the hits are promoted into the tiers above the
        one that served them. ``prefix``: stop at the first miss (later keys are neither read nor touched)."""
        fps = list(fingerprints) if fingerprints is not None else [None] * len(keys)
        owner: list[int | None] = [None] * len(keys)
        todo = list(range(len(keys)))
        for i, t in enumerate(self.tiers):
            held = [j for j in todo if keys[j] in t.objects]
            for j in held:
                owner[j] = i
            todo = [j for j in todo if j not in held]
        out: list[tuple[torch.Tensor | None, str | None]] = [(None, None)] * len(keys)
        hits: list[tuple[int, str, Item]] = []
        for j, i in enumerate(owner):
            item = None if i is None else self.tiers[i].objects[keys[j]]
            if item is not None:
                self.tiers[i].touch(keys[j])
            if item is None or (fps[j] is not None and item.fingerprint != fps[j]):
                if prefix:
                    break
                continue
            out[j] = (item.tensor(), self.tiers[i].name)
            hits.append((i, keys[j], item))
        for i, key, item in hits:
            for upper in self.tiers[:i]:
                upper.put(key, item)
        return out

    def contains(self, key: str) -> bool:
        return any(key in t.objects for t in self.tiers)

    def batched_contains(self, keys: Sequence[str]) -> int:
        return leading_hits(self.contains(k) for k in keys)

    def remove(self, key: str) -> bool:
        found = False
        for t in self.tiers:
            found = t.objects.pop(key, None) is not None or found
        return found

    def drop(self, tier: str, key: str) -> None:
        """Lose ``key`` from one tier only (an external eviction)."""
        for t in self.tiers:
            if t.name == tier:
                t.objects.pop(key, None)

    def restart(self) -> None:
        for t in self.tiers:
            if not t.persistent:
                t.objects.clear()

    def keys(self, tier: str) -> set[str]:
        return {k for t in self.tiers if t.name == tier for k in t.objects}
