"""Attention over the paged KV cache, batched across requests of different lengths.

Cache layout (one tensor per layer): `[2, num_blocks, block_size, num_kv_heads, head_dim]`, K
then V. A request's token at position `p` lives in block `block_table[p // block_size]` at offset
`p % block_size`, i.e. flat slot `block * block_size + offset`::

    block table [7, 2, 9], block_size 4
    positions 0..3 -> block 7 (slots 28..31) | 4..7 -> block 2 (slots 8..11) | 8.. -> block 9

Attention gathers whole blocks (one contiguous copy per block, not per token) into a padded
`[B, blocks * block_size, KH, D]` context, masks what lies past each request's length, and
attends. Requests are attended in groups (decodes together, prefill chunks together), each
padded to its longest query and context. Query heads that share a KV head are folded into the
query axis, so GQA never copies K or V: a group computes `[B, KH, G*Q, D] x [B, KH, L, D]`.

That is the torch path (`torch_attend`). On CPU both kinds of group skip the copy, the padding
and the mask: C kernels (model/kernels/) read K and V through the block table where they lie,
one for decodes and one for query chunks (causal, ragged); `meta.ops` (model/ops.py) picks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from headrace.model.kernels.api import NO_SCALES, KVScales

if TYPE_CHECKING:
    from headrace.model.ops import TorchOps

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)  # the fp8 KV caches


@dataclass(slots=True)
class AttnGroup:
    """Requests attended together. The torch path pads them to one query length Q and one
    context length L (`padded`); the C kernels read the lengths instead.

    tokens:   the group's rows in the flattened batch (its query tokens)
    blocks:   [B, W] block table padded with block 0 (masked out); context L = W * block_size
    ctx_lens: [B] context lengths (this step's tokens included)
    q_lens:   [B] query tokens per request; None for a group of decodes (Q == 1)
    padded:   whether the three fields below were built (the torch path needs them)
    q_index:  [B*Q] row in `tokens` for each padded query slot (len(tokens) = a zero row);
              None when every request has exactly Q query tokens
    q_keep:   rows of the padded [B*Q] layout that hold real tokens; None when no padding
    mask:     [B, 1, G*Q, L] bool, True where query row may attend; None when nothing is masked
    """

    tokens: slice
    blocks: torch.Tensor
    ctx_lens: torch.Tensor
    q_lens: torch.Tensor | None
    padded: bool
    q_index: torch.Tensor | None = None
    q_keep: torch.Tensor | None = None
    mask: torch.Tensor | None = None

    def to(self, device: torch.device) -> AttnGroup:
        if self.blocks.device == device:  # built there (on CPU, every step)
            return self

        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, non_blocking=True)

        return AttnGroup(
            self.tokens,
            self.blocks.to(device, non_blocking=True),
            self.ctx_lens.to(device, non_blocking=True),
            move(self.q_lens),
            self.padded,
            move(self.q_index),
            move(self.q_keep),
            move(self.mask),
        )


@dataclass(slots=True)
class AttentionMetadata:
    """Per-step attention inputs, shared by every layer."""

    slot_mapping: torch.Tensor  # [T] cache slot where each new token's K/V is written
    groups: list[AttnGroup]
    ops: TorchOps  # the backend's steps between the linears (model/ops.py)


def build_group(
    start: int,
    q_lens: list[int],
    ctx_lens: list[int],
    block_tables: list[list[int]],
    block_size: int,
    num_queries_per_kv: int,
    padded: bool = True,
) -> tuple[AttnGroup, torch.Tensor]:
    """Lay out one group; request b's queries are the last q_lens[b] of its ctx_lens[b] positions.
    `padded`: also build the torch path's padded layout and mask (the C kernels need neither).

    Returns the group and the cache slots of its new tokens, in token order (its slot mapping).
    """
    num_reqs = len(q_lens)
    max_q, max_ctx = max(q_lens), max(ctx_lens)
    width = -(-max_ctx // block_size)
    # one tensor from padded lists: a torch.tensor per request cost ~10 us each, every step
    table = torch.tensor(
        [blocks[:width] + [0] * (width - len(blocks[:width])) for blocks in block_tables],
        dtype=torch.long,
    )
    ctx_t = torch.tensor(ctx_lens)
    num_tokens = sum(q_lens)
    tokens = slice(start, start + num_tokens)
    q_len_t: torch.Tensor | None = None
    if max_q == 1:
        # decodes, every step: each new token's slot from the lists, as the tensor arithmetic
        # below takes ~10 small torch ops (~0.3 ms a step in the engine)
        new_slots = torch.tensor(
            [
                blocks[(c - 1) // block_size] * block_size + (c - 1) % block_size
                for blocks, c in zip(block_tables, ctx_lens, strict=True)
            ]
        )
    else:
        q_len_t = torch.tensor(q_lens)
        q_ar = torch.arange(max_q)
        valid_q = q_ar[None, :] < q_len_t[:, None]
        q_pos = ((ctx_t - q_len_t)[:, None] + q_ar[None, :]).clamp(max=max_ctx - 1)
        new_pos = q_pos[valid_q]
        owner = torch.arange(num_reqs)[:, None].expand(num_reqs, max_q)[valid_q]
        new_slots = table[owner, new_pos // block_size] * block_size + new_pos % block_size
    group = AttnGroup(tokens, table, ctx_t, q_len_t, padded)
    if not padded:
        return group, new_slots

    length = width * block_size
    pos = torch.arange(length)
    mask: torch.Tensor | None = None
    if max_q == 1:
        if any(c != length for c in ctx_lens):
            mask = (pos[None, :] < ctx_t[:, None]).view(num_reqs, 1, 1, length)
    else:
        causal = pos[None, None, :] <= q_pos[:, :, None]
        # A padded query row attends to position 0 only, so softmax never sees an empty row.
        mask = torch.where(valid_q.unsqueeze(-1), causal, (pos == 0).view(1, 1, -1)).unsqueeze(1)
    if mask is not None and num_queries_per_kv > 1:
        g = num_queries_per_kv
        mask = mask.expand(num_reqs, g, mask.shape[2], length).reshape(num_reqs, 1, -1, length)

    if any(n != max_q for n in q_lens):
        offsets = torch.tensor([0, *q_lens[:-1]]).cumsum(0)
        group.q_index = torch.where(valid_q, offsets[:, None] + q_ar[None, :], num_tokens).view(-1)
        group.q_keep = valid_q.view(-1).nonzero().squeeze(1)
    group.mask = mask
    return group, new_slots


def write_kv(
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_scales: KVScales = NO_SCALES,
) -> None:
    """This step's K and V [T, KH, D] into the cache at their slots, rounded to its dtype (fp8:
    K / k_scale and V / v_scale, to nearest even, saturating at the largest finite value, as
    the C kernels store them)."""
    _, num_blocks, block_size, num_kv_heads, head_dim = kv_cache.shape
    flat = kv_cache.view(2, num_blocks * block_size, num_kv_heads, head_dim)
    if kv_cache.dtype in FP8_DTYPES:  # torch has no index_copy_ for fp8: its bytes, then
        top = torch.finfo(kv_cache.dtype).max
        k, v = (
            (x.float() / s).clamp(-top, top).to(kv_cache.dtype).view(torch.uint8)
            for x, s in zip((k, v), kv_scales, strict=True)
        )
        flat = flat.view(torch.uint8)
    flat[0].index_copy_(0, slot_mapping, k.to(flat.dtype))
    flat[1].index_copy_(0, slot_mapping, v.to(flat.dtype))


def torch_attend(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    group: AttnGroup,
    scale: float,
    kv_scales: KVScales = NO_SCALES,
) -> torch.Tensor:
    """One group's attention with torch ops over its gathered, padded blocks (the group built
    with padded=True): q [tokens, H, D] -> [tokens, H * D]. An fp8 cache's kv_scales join the
    score's scale and the output."""
    _, num_heads, head_dim = q.shape
    num_kv_heads, block_size = kv_cache.shape[3], kv_cache.shape[2]
    # On CPU attention computes in float32 whatever the cache holds (bf16 SDPA is slow there);
    # elsewhere in the cache's dtype, or the queries' over an fp8 cache.
    compute = torch.float32 if kv_cache.device.type == "cpu" else kv_cache.dtype
    if compute in FP8_DTYPES:
        compute = q.dtype
    g = num_heads // num_kv_heads
    assert group.padded, "the torch path needs the padded layout (build_group(padded=True))"
    qg = q
    if group.q_index is not None:
        qg = torch.cat([qg, qg.new_zeros(1, num_heads, head_dim)])[group.q_index]
    b, width = group.blocks.shape
    length = width * block_size
    nq = qg.shape[0] // b
    qg = qg.view(b, nq, num_kv_heads, g, head_dim).permute(0, 2, 3, 1, 4)
    qg = qg.reshape(b, num_kv_heads, g * nq, head_dim).to(compute)
    table = group.blocks.view(-1)
    # fp8 blocks gathered as their bytes: index_select has no fp8 kernel on every device
    held = kv_cache.view(torch.uint8) if kv_cache.dtype in FP8_DTYPES else kv_cache
    kg, vg = (
        held[i].index_select(0, table).view(kv_cache.dtype).to(compute)
        .view(b, length, num_kv_heads, head_dim)
        for i in (0, 1)
    )  # fmt: skip
    k_scale, v_scale = kv_scales
    out = F.scaled_dot_product_attention(
        qg, kg.transpose(1, 2), vg.transpose(1, 2), attn_mask=group.mask, scale=scale * k_scale
    )
    if v_scale != 1.0:
        out = out * v_scale
    out = out.view(b, num_kv_heads, g, nq, head_dim).permute(0, 3, 1, 2, 4)
    out = out.reshape(b * nq, num_heads * head_dim)
    return out if group.q_keep is None else out[group.q_keep]
