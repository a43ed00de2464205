"""q4_linear (kernels/q4_linear.c) against torch's float32 linear over the dequantized weight."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from headrace.model.backend import Backend, backend_kernels
from headrace.model.kernels import Kernels
from headrace.model.layers import Q4Linear, Q8Linear
from tests.backends import KERNEL_BUILDS

pytestmark = pytest.mark.skipif(not KERNEL_BUILDS, reason="no C compiler: no CPU kernels")


@pytest.fixture(scope="module", params=KERNEL_BUILDS)
def built(request: pytest.FixtureRequest) -> Kernels:
    """Each kernel build this CPU runs: the vector paths and their plain-C twins (`c`)."""
    kernels = backend_kernels(request.param)
    assert (kernels.vector_bits > 0) == (request.param != "c")
    assert kernels.vector_bits == {"c": 0, "avx2": 256}.get(request.param, 512)
    return kernels


def _weight(n: int, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(n * 7 + k)
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=g)
    scale = torch.rand(n, k // 32, generator=g) * 0.02
    offset = -8 * scale + torch.randn(n, k // 32, generator=g) * 1e-3
    w = q.float().reshape(n, k // 32, 32) * scale[..., None] + offset[..., None]
    return scale, offset, q, w.reshape(n, k)


# 1-8: 8-row passes over the blocks; 9 and more: the panel product's tiles of 16 and 8 rows
@pytest.mark.parametrize("rows", [1, 2, 7, 8, 9, 16, 17, 24, 64, 128, 300])
@pytest.mark.parametrize("bias", [False, True])
def test_equals_the_dequantized_linear(built: Kernels, rows: int, bias: bool) -> None:
    n, k = 100, 576  # 100: panels of 6 columns and a shorter last one on either thread
    scale, offset, q, w = _weight(n, k)
    b = torch.randn(n) if bias else None
    x = torch.randn(rows, k)
    got = built.q4_linear(x, built.q4_pack(scale, offset, q), b)
    want = F.linear(x, w, b)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_module_uses_the_blocks_for_few_rows_and_torch_for_many(built: Kernels) -> None:
    n, k = 64, 128
    scale, offset, q, w = _weight(n, k)
    linear = torch.nn.Linear(k, n)
    with torch.no_grad():
        linear.weight.copy_(w)
    layer = Q4Linear(linear, built, (scale, offset, q))
    # a float32 weight: the blocks up to 128 rows, or 16 where torch's matmul has AVX-512
    assert layer.max_rows == (16 if built.vector_bits == 512 else 128)
    for rows in (1, 8, 9, layer.max_rows, layer.max_rows + 1):
        x = torch.randn(rows, k)
        torch.testing.assert_close(layer(x), linear(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("offset", [False, True])  # Q5_1 / Q5_K's: scale * q + offset
@pytest.mark.parametrize("group", [32, 16])  # Q8_0's blocks; Q6_K's scale per 16
@pytest.mark.parametrize("rows", [1, 8, 9, 16, 40])
def test_q8_equals_the_dequantized_linear(
    built: Kernels, rows: int, group: int, offset: bool
) -> None:
    n, k = 80, 576
    g = torch.Generator().manual_seed(rows)
    q = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
    scale = torch.rand(n, k // group, generator=g) * 0.01
    off = torch.randn(n, k // group, generator=g) * 0.05 if offset else None
    w = q.float().reshape(n, k // group, group) * scale[..., None]
    if off is not None:
        w = w + off[..., None]
    w = w.reshape(n, k)
    x = torch.randn(rows, k, generator=g)
    b = torch.randn(n, generator=g)
    got = built.q8_linear(x, q, scale, b, off)
    torch.testing.assert_close(got, F.linear(x, w, b), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("name", KERNEL_BUILDS)
def test_the_bundled_model_reads_its_blocks_in_float32(name: str) -> None:
    """float32 on CPU from the bundled GGUF, on every kernel build (amx too: AmxLinear takes bf16
    weights only): every decoder linear is a Q4Linear and the LM head a Q8Linear, each giving
    what its float32 weight gives; decode steps run as one call."""
    from headrace.config import ModelConfig
    from headrace.model.loader import load_model, read_arch, resolve_model_path

    path = resolve_model_path(ModelConfig().model)
    arch, source = read_arch(path)
    backend = Backend(name, torch.device("cpu"), backend_kernels(name), "test")
    model = load_model(path, arch, source, torch.float32, backend, 256).model
    q4 = [m for m in model.modules() if isinstance(m, Q4Linear)]
    assert len(q4) == 4 * arch.num_layers
    assert isinstance(model.lm_head, Q8Linear)
    for layer in (q4[0], q4[-1], model.lm_head):
        x = torch.randn(3, layer.large.weight.shape[1])
        want = F.linear(x, layer.large.weight, layer.bias)
        torch.testing.assert_close(layer(x), want, rtol=1e-4, atol=1e-4)
    assert model.fused_decode is not None and model.fused_decode.f32


@pytest.mark.parametrize("name", [b for b in KERNEL_BUILDS if b != "amx"])
def test_a_bf16_model_reads_its_blocks_for_small_batches(name: str) -> None:
    """bf16 weights without AMX (a Zen 4's default): decode-sized batches read the 4-bit blocks
    in float32, as the float32 model does (the same layer outputs), the decoder's activations
    are float32, and larger batches keep the bf16 weight where oneDNN packs it; where it cannot
    (no bf16 support in this CPU), the blocks take every row."""
    from headrace.config import ModelConfig
    from headrace.model.layers import can_pack_linears
    from headrace.model.loader import load_model, read_arch, resolve_model_path

    path = resolve_model_path(ModelConfig().model)
    arch, source = read_arch(path)
    backend = Backend(name, torch.device("cpu"), backend_kernels(name), "test")
    bf16 = load_model(path, arch, source, torch.bfloat16, backend, 256).model
    f32 = load_model(path, arch, source, torch.float32, backend, 256).model
    assert all(layer.compute_dtype == torch.float32 for layer in bf16.layers)
    assert bf16.fused_decode is not None and bf16.fused_decode.f32
    ours, theirs = bf16.layers[3].mlp.down_proj, f32.layers[3].mlp.down_proj
    assert isinstance(ours, Q4Linear) and ours.large_dtype == torch.bfloat16
    packs = can_pack_linears(torch.bfloat16, torch.device("cpu"))
    assert ours.blocks_only == (not packs) and ours.max_rows == (16 if packs else 128)
    assert theirs.max_rows == (16 if backend_kernels(name).vector_bits == 512 else 128)
    x = torch.randn(min(ours.max_rows, theirs.max_rows), arch.intermediate_size)
    assert torch.equal(ours(x), theirs(x))
    if not packs:  # a prompt-sized batch: still the blocks, the same bits as theirs give
        many = torch.randn(300, arch.intermediate_size)
        assert torch.equal(ours(many), theirs.from_blocks(many))
        return
    many = torch.randn(ours.max_rows + 1, arch.intermediate_size)
    want = theirs(many.bfloat16().float())  # the bf16 weight, from bf16 inputs
    torch.testing.assert_close(ours(many), want, rtol=0, atol=2e-2 * float(want.abs().max()))
