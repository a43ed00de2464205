"""Block accounting for the paged KV cache: allocation, reference counts, prefix caching, LRU.

The tensors live in the model runner; this module only decides which block ids a request owns.

A full block is identified by a chained hash: `h_i = H(h_{i-1}, tokens of block i)`, so equal
hashes mean equal whole prefixes. Blocks whose reference count drops to 0 stay cached (hash kept)
in an LRU free queue and are reused by a later request with the same prefix, or evicted (hash
dropped) when a fresh block is needed. Free blocks that hold nothing reusable are taken first.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

from headrace.engine.request import Request

_ROOT_HASH = b"headrace-kv-root"


@dataclass(slots=True)
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: bytes | None = None


def hash_block(parent: bytes, tokens: list[int]) -> bytes:
    """Chained content hash of one full block (collision-resistant: requests share KV by it)."""
    h = hashlib.blake2b(parent, digest_size=16)
    h.update(b",".join(str(t).encode() for t in tokens))
    return h.digest()


class KVCacheManager:
    """Owns `num_blocks` blocks of `block_size` token slots."""

    def __init__(
        self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True
    ) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Blocks with ref_count 0, least recently freed first; eviction takes from the front.
        self.free_queue: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[bytes, int] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by requests (cached-but-free blocks count as free)."""
        return 1.0 - len(self.free_queue) / self.num_blocks

    def _block_hashes(self, req: Request, num_blocks: int) -> list[bytes]:
        """The request's chained hashes for its first `num_blocks` full blocks (memoized)."""
        bs = self.block_size
        hashes = req.block_hashes
        while len(hashes) < num_blocks:
            i = len(hashes)
            parent = hashes[-1] if hashes else _ROOT_HASH
            hashes.append(hash_block(parent, req.all_token_ids[i * bs : (i + 1) * bs]))
        return hashes[:num_blocks]

    def get_computed_blocks(self, req: Request) -> tuple[list[int], int]:
        """Longest cached prefix of the request, as (block ids, tokens). At least one token is
        always left to compute, so the step that finishes the prompt can sample. None for a
        request that wants prompt logprobs: they need every prompt position's logits."""
        if not self.enable_prefix_caching or req.params.prompt_logprobs is not None:
            return [], 0
        max_blocks = (req.num_tokens - 1) // self.block_size
        hit: list[int] = []
        for h in self._block_hashes(req, max_blocks):
            block_id = self.cached.get(h)
            if block_id is None:
                break
            hit.append(block_id)
        return hit, len(hit) * self.block_size

    def allocate_slots(
        self, req: Request, num_tokens: int, computed_blocks: list[int] | None = None
    ) -> bool:
        """Make the request own enough blocks for `num_tokens` tokens, taking `computed_blocks`
        (prefix-cache hits) first. All or nothing: returns False and changes nothing if short."""
        computed_blocks = computed_blocks or []
        needed = -(-num_tokens // self.block_size) - len(req.block_ids) - len(computed_blocks)
        # Touching a cached block that sits in the free queue takes it out of the free pool.
        reclaimed = sum(1 for b in computed_blocks if self.blocks[b].ref_count == 0)
        if needed > self.num_free_blocks - reclaimed:
            return False
        for block_id in computed_blocks:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free_queue[block_id]
            block.ref_count += 1
            req.block_ids.append(block_id)
        for _ in range(max(needed, 0)):
            block_id, _ = self.free_queue.popitem(last=False)
            block = self.blocks[block_id]
            if block.block_hash is not None:
                del self.cached[block.block_hash]
                block.block_hash = None
            block.ref_count = 1
            req.block_ids.append(block_id)
        return True

    def cache_full_blocks(self, req: Request) -> None:
        """Publish the request's blocks whose every slot holds computed KV."""
        if not self.enable_prefix_caching:
            return
        num_full = req.num_computed_tokens // self.block_size
        hashes = self._block_hashes(req, num_full)
        for i in range(req.num_published_blocks, num_full):
            block = self.blocks[req.block_ids[i]]
            if block.block_hash is None and hashes[i] not in self.cached:
                block.block_hash = hashes[i]
                self.cached[hashes[i]] = block.block_id
        req.num_published_blocks = num_full

    def free(self, req: Request) -> None:
        """Drop the request's references. Tail blocks are queued first so they are evicted
        before the shared prefix; blocks holding nothing reusable go to the very front."""
        for block_id in reversed(req.block_ids):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_queue[block_id] = None
                if block.block_hash is None:
                    self.free_queue.move_to_end(block_id, last=False)
        req.block_ids = []
        req.num_published_blocks = 0
