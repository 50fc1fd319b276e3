"""Prefix cache: full KV pages keyed by a chained hash of their token ids.

The key of page j of a sequence is hash((key of page j-1, tokens of page j)), so one key
names the whole prefix up to and including that page (a path in a radix tree of pages).
A hit is verified against the stored token ids and the parent key, so a hash collision
can never hand a sequence somebody else's KV. Only full pages are cached: a partial page
is still being written by its owner.

Cached pages whose refcount drops to 0 stay indexed until the block manager hands the page
out again (then `forget`), so finished and preempted sequences leave reusable prefixes.
"""

from __future__ import annotations

ROOT_KEY = 0


def page_key(parent_key: int, tokens: tuple[int, ...]) -> int:
    # Python's hash of a tuple of ints is deterministic (no string hashing involved).
    return hash((parent_key, tokens))


class PrefixCache:
    def __init__(self):
        self._page_by_key: dict[int, int] = {}
        self._entry_by_page: dict[int, tuple[int, int, tuple[int, ...]]] = {}  # page -> (key, parent, tokens)

    def __len__(self) -> int:
        return len(self._page_by_key)

    def lookup(self, parent_key: int, tokens: tuple[int, ...]) -> tuple[int | None, int]:
        """Return (page holding exactly this prefix or None, key of this prefix)."""
        key = page_key(parent_key, tokens)
        page = self._page_by_key.get(key)
        if page is not None:
            _, parent, stored = self._entry_by_page[page]
            if parent != parent_key or stored != tokens:  # collision: treat as a miss
                page = None
        return page, key

    def insert(self, page: int, key: int, parent_key: int, tokens: tuple[int, ...]) -> None:
        """Index `page` under `key`. A prefix already indexed on another page keeps that page."""
        if key in self._page_by_key or page in self._entry_by_page:
            return
        self._page_by_key[key] = page
        self._entry_by_page[page] = (key, parent_key, tokens)

    def forget(self, page: int) -> None:
        """The page is about to hold new content: drop its index entry, if any."""
        entry = self._entry_by_page.pop(page, None)
        if entry is not None:
            del self._page_by_key[entry[0]]

    def clear(self) -> None:
        self._page_by_key.clear()
        self._entry_by_page.clear()
