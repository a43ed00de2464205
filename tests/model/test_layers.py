"""Layer-level checks that need no model file."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from headrace.model.layers import AmxLinear, PackedLinear, can_pack_linears, pack_linears
from tests.backends import amx_kernels


@pytest.mark.skipif(
    not can_pack_linears(torch.bfloat16, torch.device("cpu")), reason="no oneDNN bf16 packing"
)
@pytest.mark.parametrize("rows", [1, 5, 64])
def test_packed_linear_matches_linear(rows: int) -> None:
    torch.manual_seed(0)
    lin = nn.Linear(96, 160, bias=True).to(torch.bfloat16)
    x = torch.randn(rows, 96, dtype=torch.bfloat16)
    torch.testing.assert_close(PackedLinear(lin)(x).float(), lin(x).float(), atol=3e-2, rtol=2e-2)


def test_pack_linears_swaps_every_linear() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.Sequential(nn.ReLU(), nn.Linear(8, 4)))
    if not can_pack_linears(torch.bfloat16, torch.device("cpu")):
        pytest.skip("no oneDNN bf16 packing")
    model = model.to(torch.bfloat16)
    assert pack_linears(model, None) == {"PackedLinear": 2}
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    assert model(torch.randn(2, 8, dtype=torch.bfloat16)).shape == (2, 4)


def test_amx_linear_switches_to_onednn_past_one_slice() -> None:
    """Shapes the AMX kernel takes get an AmxLinear (others a PackedLinear); it gives
    F.linear's result on both sides of max_rows."""
    kernels = amx_kernels()
    assert can_pack_linears(torch.bfloat16, torch.device("cpu"))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96, bias=True), nn.Linear(96, 40)).to(torch.bfloat16)
    ref = [nn.Linear(64, 96, bias=True).to(torch.bfloat16), nn.Linear(96, 40).to(torch.bfloat16)]
    for r, m in zip(ref, model, strict=True):
        r.load_state_dict(m.state_dict())
    assert pack_linears(model, kernels) == {"AmxLinear": 1, "PackedLinear": 1}
    amx = model[0]
    assert isinstance(amx, AmxLinear)
    for rows in (1, amx.max_rows, amx.max_rows + 1, 200):
        x = torch.randn(rows, 64, dtype=torch.bfloat16)
        torch.testing.assert_close(amx(x).float(), ref[0](x).float(), atol=3e-2, rtol=2e-2)
    x3 = torch.randn(2, 5, 64, dtype=torch.bfloat16)  # leading dims kept
    assert amx(x3).shape == (2, 5, 96)
    logits = AmxLinear(ref[0], kernels, torch.float32)  # as the LM head: float32 either side
    for rows in (1, logits.max_rows + 1):
        x = torch.randn(rows, 64, dtype=torch.bfloat16)
        got = logits(x)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, ref[0](x).float(), atol=3e-2, rtol=2e-2)


def test_no_packing_for_float32() -> None:
    assert not can_pack_linears(torch.float32, torch.device("cpu"))
