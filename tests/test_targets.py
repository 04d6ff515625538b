"""Value targets against their one-chunk-at-a-time reference, and the segment conv's gradients."""

from __future__ import annotations

import pytest
import torch

from trainer.ops.fastweight.layout import build_layout
from trainer.ttt.targets import naive_value_targets, segment_conv, value_targets

F64 = torch.float64


def packed_positions(*lengths: int) -> torch.Tensor:
    return torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)


@pytest.mark.parametrize("method", ["inplace", "ntp", "recon"])
@pytest.mark.parametrize("lengths", [(17,), (3, 9, 1, 10), (6, 6)])
@pytest.mark.parametrize("with_proj", [True, False])
def test_targets_equal_reference(method, lengths, with_proj):
    pos = packed_positions(*lengths)
    source = torch.randn(2, pos.shape[1], 6, dtype=F64)
    conv = torch.randn(6, 1, 5, dtype=F64)
    proj = torch.randn(6, 6, dtype=F64) if with_proj else None
    layout = build_layout(pos, 4, batch_size=2)
    got = value_targets(method, source, layout, conv, proj)
    want = naive_value_targets(method, source, pos, 4, conv, proj)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_ntp_target_is_next_position_and_zero_at_document_end():
    pos = packed_positions(3, 2)
    source = torch.arange(5, dtype=F64).reshape(1, 5, 1)
    got = value_targets("ntp", source, build_layout(pos, 4), None, None)
    assert got.flatten().tolist() == [1, 2, 0, 4, 0]


def test_inplace_conv_sees_next_tokens_only_inside_its_chunk():
    source = torch.zeros(1, 8, 1, dtype=F64)
    source[0, 4] = 1.0  # first token of chunk 1
    conv = torch.zeros(1, 1, 5, dtype=F64)
    conv[0, 0, 3] = 1.0  # tap reading t+1
    got = value_targets("inplace", source, build_layout(torch.arange(8), 4), conv, None)
    assert got.flatten().tolist() == [0, 0, 0, 0, 0, 0, 0, 0]  # position 3 is in chunk 0: no read across
    source[0, 5] = 2.0
    got = value_targets("inplace", source, build_layout(torch.arange(8), 4), conv, None)
    assert got.flatten().tolist() == [0, 0, 0, 0, 2, 0, 0, 0]


@pytest.mark.parametrize("kernel", [1, 3, 5, 7])
def test_segment_conv_gradcheck(kernel):
    layout = build_layout(packed_positions(2, 7, 4), 3)
    x = torch.randn(1, 13, 3, dtype=F64, requires_grad=True)
    w = torch.randn(3, 1, kernel, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: segment_conv(x, w, layout.segment_ids), (x, w))
