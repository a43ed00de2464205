"""Building blocks of a Llama-family decoder: RMSNorm, rotary embedding, SwiGLU MLP."""

from __future__ import annotations

import functools
import math
from collections import Counter
from collections.abc import Callable, Collection
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from headrace.model.gguf import Q4Blocks, Q8Blocks, split_nibbles
from headrace.model.kernels import W_Q4, Kernels, weight_format

if TYPE_CHECKING:
    from headrace.model.ops import TorchOps


class RMSNorm(nn.Module):
    """RMSNorm computed in float32, optionally fused with the residual add before it."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size, dtype=torch.float32), requires_grad=False)
        self.eps = eps

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        out_dtype: torch.dtype,
        ops: TorchOps,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (normed in out_dtype, new residual). The residual stream stays float32
        whatever the weights."""
        return ops.add_rms_norm(x, residual, self.weight, self.eps, out_dtype)


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1 frequency-dependent RoPE scaling (long wavelengths slowed by `factor`)."""
    factor = float(scaling["factor"])
    low = float(scaling.get("low_freq_factor", 1.0))
    high = float(scaling.get("high_freq_factor", 4.0))
    old_len = float(scaling["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Rotate-half RoPE with a precomputed cos/sin table indexed by absolute position."""

    def __init__(
        self, head_dim: int, max_positions: int, theta: float, scaling: dict[str, Any] | None
    ) -> None:
        super().__init__()
        exponents = torch.arange(0, head_dim, 2, dtype=torch.float64, device="cpu") / head_dim
        inv_freq = 1.0 / (theta**exponents)
        rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
        if rope_type == "llama3":
            inv_freq = _llama3_inv_freq(inv_freq, scaling or {})
        elif rope_type == "linear":
            inv_freq = inv_freq / float((scaling or {})["factor"])
        elif rope_type != "default":
            raise ValueError(f"rope scaling type {rope_type!r} is not supported")
        self._inv_freq = inv_freq.cpu()
        self.max_positions = max_positions
        self.cos = self.sin = torch.empty(0)

    def build(self, device: torch.device) -> None:
        """Compute the cos/sin tables on `device` (kept out of the module's state, so a model built
        on the meta device gets real tables)."""
        t = torch.arange(self.max_positions, dtype=torch.float64, device="cpu")
        freqs = torch.outer(t, self._inv_freq.to("cpu", torch.float64))
        emb = torch.cat([freqs, freqs], dim=-1)
        self.cos = emb.cos().float().to(device)
        self.sin = emb.sin().float().to(device)

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q: [T, H, D], k: [T, KH, D] (float32) -> rotated copies."""
        cos = self.cos[positions].unsqueeze(1)
        sin = self.sin[positions].unsqueeze(1)
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)) with gate and up fused into one matrix."""

    def __init__(self, hidden: int, intermediate: int, bias: bool) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(hidden, 2 * intermediate, bias=bias)
        self.down_proj = nn.Linear(intermediate, hidden, bias=bias)

    def forward(self, x: torch.Tensor, ops: TorchOps) -> torch.Tensor:
        return self.down_proj(ops.silu_mul(self.gate_up_proj(x)))


class PackedLinear(nn.Module):
    """A bf16 CPU linear whose weight oneDNN has reordered into its blocked layout once, at load.

    Measured here (2 cores, avx512_bf16): 1.5-2x faster than `F.linear` on the same weight for
    1-64 rows, the decode shapes. Same math (bf16 inputs, fp32 accumulation).
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach())
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


class AmxLinear(nn.Module):
    """A bf16 CPU linear that runs headrace's AMX kernel (kernels/amx_linear.c) for up to
    `max_rows` rows and oneDNN's packed matmul for more, holding the weight in both orders.

    Why both: the AMX kernel reads each weight once, front to back, for up to 64 rows (beyond,
    64 at a time), at up to twice oneDNN's rate. Timed over SmolLM2's 30 layers of linears,
    alternated with oneDNN in one process: 0.45-0.62 of oneDNN's time at 1-32 rows, 0.67-0.73
    at 33-64, 0.72-0.78 at 80-128; the LM head 0.52-0.89 up to 96 rows and 0.92-1.02 at 128.
    From 192 rows on oneDNN's blocking catches up (0.89-1.00 at 192-256) and wins on prompt
    chunks (1.7x at 2048), so it keeps those. The second copy costs the weight's size again in
    memory. Same math either way: bf16 inputs, float32 accumulation, bf16 out (float32 with
    `out_dtype`, as the LM head has: logits unrounded).

    `q4`: the weight as the GGUF file's 4-bit blocks, from which it was dequantized. The AMX
    kernel then keeps those 4 bits (plus a float16 scale and offset per 32 weights: 5 bits a
    weight, against bf16's 16) and makes each bf16 tile from them as it multiplies: the same
    bf16 values, so the same results, from under a third of the bytes. A decode step reads
    every weight, so at few rows it is bound by memory; making the tiles costs vector work
    instead, about 30 ns a tile per core here.
    """

    max_rows = 128

    def __init__(
        self,
        linear: nn.Linear,
        kernels: Kernels,
        out_dtype: torch.dtype = torch.bfloat16,
        q4: Q4Blocks | None = None,
    ) -> None:
        super().__init__()
        self.kernels = kernels
        self.in_features = linear.in_features
        self.out_dtype = out_dtype
        packed = None if q4 is None else kernels.amx_pack_q4(*q4)
        self.packed = kernels.amx_pack(linear.weight) if packed is None else packed
        self.bias = None if linear.bias is None else linear.bias.detach().float().contiguous()
        self.onednn = PackedLinear(linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() <= self.max_rows * self.in_features:
            return self.kernels.amx_linear(x, self.packed, self.bias, self.out_dtype)
        return self.onednn(x).to(self.out_dtype)

    def argmax(self, x: torch.Tensor) -> torch.Tensor | None:
        """forward(x).argmax(-1) for [M, K] x, computed without forward's rows (greedy
        sampling's LM head: at 64 rows writing and re-reading float32 logits cost more than
        the tiles), where forward's rows would be the AMX kernel's float32 sums, so the argmax
        is the same. None elsewhere (a bias, bf16 out, more than max_rows rows)."""
        if self.bias is not None or self.out_dtype != torch.float32 or x.shape[0] > self.max_rows:
            return None
        return self.kernels.amx_linear_argmax(x, self.packed)

    @property
    def four_bit(self) -> bool:
        """Whether the AMX kernel reads this weight as 4-bit blocks."""
        return weight_format(self.packed) == W_Q4


class _BlockLinear(nn.Module):
    """A CPU linear holding its weight twice: as GGUF blocks, which a C kernel reads in float32
    for up to `max_rows` rows (every row where `blocks_only`), and as `large`, the nn.Linear it
    replaced (float32, or bf16 that pack_linears then hands to oneDNN), for more. Its output has
    its input's dtype; a decoder layer whose linears are all these computes in float32
    (LlamaDecoderLayer.compute_dtype), so only `large` rounds to bf16.

    keep_large=False: the blocks alone, for every row (`large` is None; `linear` gives only
    its shape, dtype and bias, its weight may be on the meta device). The loader chooses it
    where the weights' float copies would not fit in memory."""

    def __init__(self, linear: nn.Linear, kernels: Kernels, keep_large: bool = True) -> None:
        super().__init__()
        self.kernels = kernels
        self.out_features = linear.out_features
        self.large = linear if keep_large else None
        self.large_dtype = linear.weight.dtype
        # Against a float32 `large`, the kernels' panel product (9+ rows, 256-bit vectors)
        # matched or beat torch's matmul up to 128 rows on an AVX2 EPYC, torch's blocking
        # winning from 256 (docs/performance.md). The blocks stop at 16 where torch is the
        # faster one: with AVX-512 its float32 matmul is twice as wide (ahead from 32 rows on
        # an AVX-512 Xeon), and a bf16 `large` is oneDNN's (level at 16 rows there, ahead
        # after; bf16 dot products on Zen 4 double its rate again).
        # A bf16 `large` that oneDNN cannot pack (a CPU without its bf16 paths, as this AVX2
        # EPYC) is torch's bf16 matmul at ~20 GFLOP/s against the blocks' ~155 at any row
        # count: then the blocks take every row, prompt chunks too.
        wide = kernels.vector_bits > 256
        bf16 = self.large_dtype == torch.bfloat16
        self.blocks_only = not keep_large or (
            bf16 and not can_pack_linears(torch.bfloat16, torch.device("cpu"))
        )
        self.max_rows = 128 if (not bf16 and not wide) or self.blocks_only else 16
        self.bias = None if linear.bias is None else linear.bias.detach().float().contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows_fit = x.dim() == 2 and (self.blocks_only or x.shape[0] <= self.max_rows)
        if self.large is None or rows_fit:
            lead = x.shape[:-1]
            y = self.from_blocks(x.reshape(-1, x.shape[-1]).float())
            return y.reshape(*lead, y.shape[-1]).to(x.dtype)
        return self.large(x.to(self.large_dtype)).to(x.dtype)

    def from_blocks(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class Q4Linear(_BlockLinear):
    """A linear that reads the GGUF file's 4-bit blocks (kernels/q4_linear.c: AVX2 + FMA, or plain
    C) for decode-sized batches.

    Why: a decode step reads every weight; float32 weights are 4 bytes each (bf16 ones 2), the
    blocks 0.75 bytes a weight, so few-row steps, bound by memory, read under a fifth (a third)
    of the bytes. The values are the same (the blocks are what the weight was dequantized from);
    only the order of the float32 sums differs. Used where the AMX kernel is not: on AMX,
    AmxLinear reads the same blocks.
    """

    def __init__(
        self, linear: nn.Linear, kernels: Kernels, q4: Q4Blocks, keep_large: bool = True
    ) -> None:
        super().__init__(linear, kernels, keep_large)
        self.q4 = kernels.q4_pack(*q4)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` of the weight, dequantized: [len(ids), K] float32, `dequantize`'s bits."""
        nibbles = self.q4.nibbles[ids]
        q = split_nibbles(nibbles, dim=-1).float()
        w = q * self.q4.scale[ids][..., None] + self.q4.offset[ids][..., None]
        return w.reshape(len(ids), -1)

    def from_blocks(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernels.q4_linear(x, self.q4, self.bias)


class Q8Linear(_BlockLinear):
    """Q4Linear's twin for a weight stored as int8 with a scale (and an offset) per group: Q8_0
    (a scale per 32: 1.06 bytes a weight against float32's 4), the bundled model's LM head, tied
    to the embedding; Q6_K (a scale per 16: 1.25 bytes), in which Q4_K_M files hold their
    embedding, attn_v and ffn_down; and the 5-bit types (Q5_0, Q5_1, Q5_K: 1.25 or 1.125)."""

    def __init__(
        self, linear: nn.Linear, kernels: Kernels, q8: Q8Blocks, keep_large: bool = True
    ) -> None:
        super().__init__(linear, kernels, keep_large)
        self.scale, self.q = q8.scale.float().contiguous(), q8.q.contiguous()
        self.offset = None if q8.offset is None else q8.offset.float().contiguous()

    def from_blocks(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernels.q8_linear(x, self.q, self.scale, self.bias, self.offset)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` of the weight, dequantized: [len(ids), K] float32, `dequantize`'s bits."""
        scale = self.scale[ids]
        w = self.q[ids].float().reshape(len(ids), scale.shape[1], -1) * scale[..., None]
        if self.offset is not None:
            w = w + self.offset[ids][..., None]
        return w.reshape(len(ids), -1)


class BlockEmbedding(nn.Module):
    """An embedding table kept as GGUF blocks (`blocks`: a Q4Linear or Q8Linear, the tied LM
    head's own where the head is the embedding): each row looked up is dequantized as it is
    read, the values of the dequantized table, which is never made (4 bytes a weight: 1.5 GiB
    for a 128k vocabulary of 3072)."""

    def __init__(self, blocks: Q4Linear | Q8Linear, dtype: torch.dtype) -> None:
        super().__init__()
        self.blocks = blocks
        self.dtype = dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        return self.blocks.rows(flat).to(self.dtype).reshape(*ids.shape, -1)


class SplitLinear(nn.Module):
    """A fused linear (q/k/v, gate/up) whose parts' GGUF blocks differ in kind, as a Q4_K_M
    file's Q4_K q and k with a Q6_K v: each part reads its own blocks (Q4Linear, Q8Linear),
    their outputs joined in the fused order."""

    def __init__(self, parts: list[nn.Module]) -> None:
        super().__init__()
        self.parts = nn.ModuleList(parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([part(x) for part in self.parts], dim=-1)


def block_linear(
    linear: nn.Linear,
    kernels: Kernels,
    parts: list[Q4Blocks | Q8Blocks],
    keep_large: bool = True,
) -> nn.Module:
    """The module that reads `parts`, the GGUF blocks of `linear`'s row ranges in order (one, or
    a fused linear's q/k/v or gate/up): a Q4Linear where all are 4-bit (Q4Blocks), a Q8Linear
    where all are 8-bit (Q8Blocks: a part's scales and offsets per 32 given per 16 where another
    part has them per 16, offsets of 0 where another part has some), else a SplitLinear of one
    such module a part."""
    eight = [isinstance(part, Q8Blocks) for part in parts]
    if not any(eight):
        q4 = cast(list[Q4Blocks], parts)
        scale, offset, q = (torch.cat([part[i] for part in q4]) for i in range(3))
        return Q4Linear(linear, kernels, (scale, offset, q), keep_large)
    if all(eight):
        q8 = cast(list[Q8Blocks], parts)
        groups = [part.q.shape[1] // part.scale.shape[1] for part in q8]
        group = min(groups)

        def per_group(values: list[torch.Tensor]) -> torch.Tensor:
            pairs = zip(values, groups, strict=True)
            return torch.cat([v.repeat_interleave(g // group, dim=1) for v, g in pairs])

        scale = per_group([part.scale for part in q8])
        offsets = None
        if any(part.offset is not None for part in q8):
            offsets = per_group(
                [torch.zeros_like(p.scale) if p.offset is None else p.offset for p in q8]
            )
        joined = Q8Blocks(scale, torch.cat([part.q for part in q8]), offsets)
        return Q8Linear(linear, kernels, joined, keep_large)
    pieces, start = [], 0
    for part in parts:
        rows = part.q.shape[0] if isinstance(part, Q8Blocks) else part[2].shape[0]
        piece = nn.Linear(
            linear.in_features, rows, linear.bias is not None, "meta", linear.weight.dtype
        )
        piece.weight = nn.Parameter(linear.weight[start : start + rows], requires_grad=False)
        if linear.bias is not None:
            piece.bias = nn.Parameter(linear.bias[start : start + rows], requires_grad=False)
        pieces.append(block_linear(piece, kernels, [part], keep_large))
        start += rows
    return SplitLinear(pieces)


def reads_blocks(module: nn.Module) -> bool:
    """Whether `module` is a linear that reads GGUF blocks in float32 (its output: its input's
    dtype)."""
    return isinstance(module, _BlockLinear | SplitLinear)


@functools.cache
def can_pack_linears(dtype: torch.dtype, device: torch.device) -> bool:
    """oneDNN weight packing exists for bf16 on CPU builds with mkldnn; check it agrees with
    `F.linear` before trusting it."""
    if device.type != "cpu" or dtype != torch.bfloat16 or not torch.backends.mkldnn.is_available():
        return False
    try:
        probe = nn.Linear(64, 32, bias=True).to(dtype)
        x = torch.randn(3, 64, dtype=dtype)
        got = PackedLinear(probe)(x).float()
        return bool(torch.allclose(got, probe(x).float(), atol=5e-2, rtol=1e-2))
    except (RuntimeError, AttributeError):
        return False


def pack_linears(
    module: nn.Module,
    kernels: Kernels | None,
    float_out: Collection[str] = (),
    q4: Callable[[str], Q4Blocks | None] | None = None,
    prefix: str = "",
) -> Counter[str]:
    """Swap every nn.Linear below `module` for an AmxLinear where headrace's AMX kernel takes its
    shape, else a PackedLinear; returns how many of each (and of AmxLinears with 4-bit weights).
    AmxLinears named in `float_out` (the LM head) give float32 outputs. q4: a linear's 4-bit
    GGUF blocks by its qualified name (`layers.0.mlp.down_proj`), or None."""
    count: Counter[str] = Counter()
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear):
            if kernels is not None and kernels.amx_fits(child.out_features, child.in_features):
                dtype = torch.float32 if name in float_out else torch.bfloat16
                blocks = None if q4 is None else q4(prefix + name)
                amx = AmxLinear(child, kernels, dtype, blocks)
                count["AmxLinear with 4-bit weights" if amx.four_bit else "AmxLinear"] += 1
                setattr(module, name, amx)
            else:
                setattr(module, name, PackedLinear(child))
                count["PackedLinear"] += 1
        else:
            count += pack_linears(child, kernels, float_out, q4, f"{prefix}{name}.")
    return count
