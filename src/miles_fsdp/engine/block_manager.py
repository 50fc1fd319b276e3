"""KV pages: free list, refcounts, prefix-cache hits.

Page 0 is never handed out: it is the scratch page that padded rows of a CUDA-graph batch
write to, so padding can never touch a live sequence. A sequence's position p lives in
page `block_table[p // page_size]` at offset `p % page_size` (slot = page * S + offset).

Free pages sit in an ordered set, oldest first; allocation takes the oldest, so recently
freed pages (still indexed by the prefix cache) survive longest. Sequences free their
pages last-page-first, so a prefix's deep pages are evicted before its root.
"""

from __future__ import annotations

from collections import OrderedDict

from miles_fsdp.engine.radix_cache import ROOT_KEY, PrefixCache
from miles_fsdp.engine.sequence import Sequence


class BlockManager:
    def __init__(self, num_pages: int, page_size: int, prefix_cache: bool = True):
        if num_pages < 2:
            raise ValueError(f"BlockManager: num_pages={num_pages}; need >= 2 (page 0 is scratch)")
        self.num_pages = num_pages
        self.page_size = page_size
        self.cache = PrefixCache() if prefix_cache else None
        self.ref = [0] * num_pages
        self._free: OrderedDict[int, None] = OrderedDict((p, None) for p in range(1, num_pages))

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def capacity_tokens(self) -> int:
        """Tokens the pages other than the scratch page hold: the most one sequence can use."""
        return (self.num_pages - 1) * self.page_size

    def pages_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.page_size)

    def match(self, seq: Sequence) -> tuple[list[int], list[int]]:
        """Cached pages (and their keys) holding a prefix of `seq`. The page holding the last
        token is never matched: that token must run through the model to give logits."""
        if self.cache is None:
            return [], []
        S = self.page_size
        pages, keys, parent = [], [], ROOT_KEY
        for j in range((seq.num_tokens - 1) // S):
            page, key = self.cache.lookup(parent, tuple(seq.token_ids[j * S : (j + 1) * S]))
            if page is None:
                break
            pages.append(page)
            keys.append(key)
            parent = key
        return pages, keys

    def admit(self, seq: Sequence, hit_pages: list[int], hit_keys: list[int], end: int) -> bool:
        """Give a waiting `seq` the hit pages plus fresh pages covering positions [0, end).
        All or nothing: returns False (and changes nothing) if pages run short."""
        assert not seq.block_table, "admit() is for sequences holding no pages"
        revived = sum(1 for p in hit_pages if self.ref[p] == 0)  # cached but free: leave the free set
        fresh = self.pages_for(end) - len(hit_pages)
        if revived + fresh > self.num_free:
            return False
        for p in hit_pages:
            if self.ref[p] == 0:
                del self._free[p]
            self.ref[p] += 1
        seq.block_table = list(hit_pages)
        seq.page_hashes = list(hit_keys)
        seq.num_computed = len(hit_pages) * self.page_size
        self._take(seq, fresh)
        return True

    def grow(self, seq: Sequence, end: int) -> bool:
        """Make `seq.block_table` cover positions [0, end); False if pages run short."""
        fresh = self.pages_for(end) - len(seq.block_table)
        if fresh > self.num_free:
            return False
        self._take(seq, fresh)
        return True

    def _take(self, seq: Sequence, n: int) -> None:
        for _ in range(max(0, n)):
            page, _ = self._free.popitem(last=False)
            if self.cache is not None:
                self.cache.forget(page)
            self.ref[page] = 1
            seq.block_table.append(page)

    def register(self, seq: Sequence) -> None:
        """Index the pages of `seq` that became full of computed KV."""
        if self.cache is None:
            return
        S = self.page_size
        for j in range(len(seq.page_hashes), seq.num_computed // S):
            parent = seq.page_hashes[-1] if seq.page_hashes else ROOT_KEY
            tokens = tuple(seq.token_ids[j * S : (j + 1) * S])
            _, key = self.cache.lookup(parent, tokens)
            self.cache.insert(seq.block_table[j], key, parent, tokens)
            seq.page_hashes.append(key)

    def free(self, seq: Sequence) -> None:
        for page in reversed(seq.block_table):
            self.ref[page] -= 1
            if self.ref[page] == 0:
                self._free[page] = None
        seq.block_table = []
        seq.page_hashes = []
        seq.num_computed = 0
        seq.draft, seq.draft_computed = [], 0  # the draft's KV lived in these pages too

    def trim(self, seq: Sequence, n_tokens: int) -> None:
        """Give back the pages of `seq` beyond those holding positions [0, n_tokens): e.g. the
        KV of speculative tokens the target rejected."""
        while len(seq.block_table) > self.pages_for(n_tokens):
            page = seq.block_table.pop()
            self.ref[page] -= 1
            if self.ref[page] == 0:
                self._free[page] = None

    def invalidate_cache(self) -> None:
        """Forget every cached prefix (after a weight update their KV is stale)."""
        if self.cache is not None:
            self.cache.clear()
