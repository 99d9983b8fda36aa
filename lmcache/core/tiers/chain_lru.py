"""Least-recently-used order that keeps prefix chains whole: a chain loses its tail before its head.

A chunk is reachable only through its whole prefix (keys.py: a lookup walks from the first chunk and stops
at the first miss). Plain per-chunk LRU evicts a prompt's head first (it was touched first), which leaves
the prompt's later chunks in memory where no lookup can ever reach them. Here each entry remembers its
parent (the previous chunk of its prompt, from the chunk header), and eviction takes the least recently
used entry *that no present entry names as its parent* (a leaf): a chain shrinks from its tail, a shared
head stays while any continuation of it is cached, and nothing is orphaned by this tier's own evictions.

Only when every evictable entry is some present entry's parent (the leaves are all being read) does it
fall back to the least recently used evictable entry, so a tier never refuses room that plain LRU would
make. Not thread-safe: the owning tier's lock covers it.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Generic, Iterable, Iterator, TypeVar

from lmcache.core.keys import ObjectKey

V = TypeVar("V")


class ChainLru(Generic[V]):
    """Key -> value in recency order (least recent first), with parent links for tail-first eviction.

    Invariant: ``_children[p]`` is exactly the set of present keys whose parent is ``p`` (present or not),
    so "is a leaf" is one dict lookup and a chain's links survive its head leaving and coming back.
    """

    def __init__(self) -> None:
        self._items: OrderedDict[ObjectKey, V] = OrderedDict()
        self._parent: dict[ObjectKey, ObjectKey] = {}
        self._children: dict[ObjectKey, set[ObjectKey]] = {}

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def __iter__(self) -> Iterator[ObjectKey]:
        return iter(self._items)

    def get(self, key: ObjectKey) -> V | None:
        return self._items.get(key)

    def values(self) -> Iterable[V]:
        return self._items.values()

    def add(self, key: ObjectKey, value: V, parent: ObjectKey | None = None) -> None:
        """Insert (or replace) as the most recent entry; ``parent``: the previous chunk of its prompt."""
        if key in self._items:
            self.pop(key)
        self._items[key] = value
        if parent is not None and parent != key:
            self._parent[key] = parent
            self._children.setdefault(parent, set()).add(key)

    def touch(self, key: ObjectKey) -> None:
        if key in self._items:
            self._items.move_to_end(key)

    def pop(self, key: ObjectKey) -> V | None:
        value = self._items.pop(key, None)
        parent = self._parent.pop(key, None)
        if parent is not None:
            siblings = self._children.get(parent)
            if siblings is not None:
                siblings.discard(key)
                if not siblings:
                    del self._children[parent]
        return value

    def is_leaf(self, key: ObjectKey) -> bool:
        return not self._children.get(key)

    def victim(self, evictable: Callable[[V], bool] = lambda _: True) -> ObjectKey | None:
        """The entry to evict next: the least recent evictable leaf, else the least recent evictable entry."""
        fallback = None
        for key, value in self._items.items():
            if not evictable(value):
                continue
            if not self._children.get(key):
                return key
            if fallback is None:
                fallback = key
        return fallback

    def clear(self) -> None:
        self._items.clear()
        self._parent.clear()
        self._children.clear()

    def reorder(self, entries: Iterable[tuple[ObjectKey, V]], recent_first: Iterable[ObjectKey] = ()) -> None:
        """Replace the contents with ``entries`` (least recent first), keeping the parent links of keys that
        stay, then make the keys of ``recent_first`` (in that order) the most recent."""
        parents = dict(self._parent)
        self.clear()
        for key, value in entries:
            self.add(key, value, parents.get(key))
        for key in recent_first:
            self.touch(key)
