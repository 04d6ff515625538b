"""The chunk scan against the prefix-sum formulation, its gradients, state passing and memory."""

from __future__ import annotations

import re

import pytest
import torch

from trainer.ops.fastweight import (
    chunk_scan,
    clip_delta,
    gated_mean,
    naive_fastweight,
    naive_normalized_fastweight,
    state_transfer,
    write_keys,
)
from trainer.ops.fastweight.layout import build_layout, document_position_ids

F64 = torch.float64


def packed_positions(*lengths: int) -> torch.Tensor:
    return torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)


def random_inputs(batch, seq, h=7, d=5, dtype=F64, requires_grad=False):
    z = torch.randn(batch, seq, h, dtype=dtype, requires_grad=requires_grad)
    v = torch.randn(batch, seq, d, dtype=dtype, requires_grad=requires_grad)
    return z, v


@pytest.mark.parametrize(
    "lengths,chunk",
    [((16,), 4), ((19,), 4), ((3, 9, 1, 10), 4), ((7, 12, 5), 5), ((2,), 8), ((33,), 1)],
)
def test_scan_equals_prefix_sum(lengths, chunk):
    pos = packed_positions(*lengths)
    z, v = random_inputs(2, pos.shape[1])
    out, _ = chunk_scan(z, v, build_layout(pos, chunk, batch_size=2), lr=0.7)
    torch.testing.assert_close(out, naive_fastweight(z, v, pos, chunk, lr=0.7), rtol=1e-12, atol=1e-12)


def normalized_scan(z, v, pos, chunk, lr, gates=None):
    """The normalized write as the MLP runs it: unit keys, gated values and the gate mass through the chunk
    scan, the read divided by the mass."""
    layout = build_layout(pos, chunk, batch_size=z.shape[0])
    gates = torch.full_like(z[..., :1], 0.5) if gates is None else gates
    out, _ = chunk_scan(write_keys(z, "normalized"), gates * v, layout, lr)
    mass, _ = chunk_scan(torch.ones_like(gates), gates, layout, 1.0)
    return gated_mean(out, mass)


@pytest.mark.parametrize("lengths,chunk", [((16,), 4), ((3, 9, 1, 10), 4), ((7, 12, 5), 5), ((33,), 1)])
def test_normalized_scan_equals_the_token_pair_sum(lengths, chunk):
    pos = packed_positions(*lengths)
    z, v = random_inputs(2, pos.shape[1], requires_grad=True)
    gates = torch.rand(2, pos.shape[1], 1, dtype=torch.float64, requires_grad=True)
    out = normalized_scan(z, v, pos, chunk, 0.7, gates)
    want = naive_normalized_fastweight(z, v, pos, chunk, 0.7, gates)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(out)
    got_grads = torch.autograd.grad((out * grad).sum(), (z, v, gates))
    want_grads = torch.autograd.grad((want * grad).sum(), (z, v, gates))
    for got, expected in zip(got_grads, want_grads):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_equal_gates_read_the_plain_mean_of_earlier_chunks():
    pos = packed_positions(5, 14)
    z, v = random_inputs(1, pos.shape[1])
    out = normalized_scan(z, v, pos, 4, 1.0)  # the drop-in gates: all 1/2
    keys = write_keys(z, "normalized")
    t, first = 16, 5  # token 11 of the second document (chunk 2) reads its positions 0-7
    want = sum((keys[0, t] @ keys[0, s]) * v[0, s] for s in range(first, first + 8)) / 8
    torch.testing.assert_close(out[0, t], want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out, naive_normalized_fastweight(z, v, pos, 4, 1.0), rtol=1e-12, atol=1e-12)


def test_a_gated_write_is_not_diluted_by_the_tokens_around_it():
    """One association among 1,000 tokens: the plain mean reads it at 1/1000 of its value, a gate open only
    there reads it whole."""
    n, chunk = 1024, 8
    pos = packed_positions(n)
    z, v = random_inputs(1, n)
    z[0, -1] = z[0, 3]  # the last token queries the key written at position 3
    gates = torch.full((1, n, 1), 1e-9, dtype=torch.float64)
    gates[0, 3] = 1.0
    plain = normalized_scan(z, v, pos, chunk, 1.0)[0, -1]
    gated = normalized_scan(z, v, pos, chunk, 1.0, gates)[0, -1]
    torch.testing.assert_close(gated, v[0, 3], rtol=1e-5, atol=1e-5)
    assert (plain - v[0, 3]).norm() > 0.9 * v[0, 3].norm()


def test_normalized_read_ignores_the_activation_scale_and_is_bounded_at_any_length():
    pos = packed_positions(64)
    z, v = random_inputs(1, 64)
    z[:, 0] *= 1e4  # an attention-sink token with massive activations
    gates = torch.rand(1, 64, 1, dtype=torch.float64)
    out = normalized_scan(z, v, pos, 4, 1.0, gates)
    torch.testing.assert_close(normalized_scan(1e3 * z, v, pos, 4, 1.0, gates), out, rtol=1e-10, atol=1e-12)
    assert out.norm(dim=-1).max() <= v.norm(dim=-1).max()  # a weighted mean with weights in [-1, 1]
    raw, _ = chunk_scan(z, v, build_layout(pos, 4), 1.0)
    assert raw.norm(dim=-1).max() > 1e3 * v.norm(dim=-1).max()  # the raw write's gain: the sink dominates


def test_documents_marked_by_a_position_jump_restart_their_state():
    pos = torch.cat([torch.arange(6), torch.arange(9, 20)]).unsqueeze(0)  # second document starts mid-chunk
    z, v = random_inputs(1, pos.shape[1])
    out, _ = chunk_scan(z, v, build_layout(pos, 4), lr=0.7)
    torch.testing.assert_close(out, naive_fastweight(z, v, pos, 4, lr=0.7), rtol=1e-12, atol=1e-12)


def test_rows_with_different_documents():
    pos = torch.cat([packed_positions(5, 13), packed_positions(11, 7)])
    z, v = random_inputs(2, 18)
    layout = build_layout(pos, 4)
    assert len(layout.groups) == 2  # rows are scanned separately
    out, _ = chunk_scan(z, v, layout, lr=0.5)
    torch.testing.assert_close(out, naive_fastweight(z, v, pos, 4, lr=0.5), rtol=1e-12, atol=1e-12)


def test_first_chunk_reads_nothing_and_later_chunks_read_only_the_past():
    z, v = random_inputs(1, 12)
    layout = build_layout(torch.arange(12), 4)
    out, _ = chunk_scan(z, v, layout, lr=1.0)
    assert torch.equal(out[:, :4], torch.zeros_like(out[:, :4]))
    v_future = v.clone()
    v_future[:, 4:] += 1.0  # writes of chunks 1 and 2 must not reach chunk 1's outputs
    out_future, _ = chunk_scan(z, v_future, layout, lr=1.0)
    torch.testing.assert_close(out_future[:, :8], out[:, :8])
    assert not torch.allclose(out_future[:, 8:], out[:, 8:])


def test_gradients_match_autograd_of_the_reference():
    pos = packed_positions(6, 11)
    z, v = random_inputs(2, 17, requires_grad=True)
    grad = torch.randn(2, 17, 5, dtype=F64)
    (g_scan_z, g_scan_v) = torch.autograd.grad((chunk_scan(z, v, build_layout(pos, 4, 2), 0.3)[0] * grad).sum(), (z, v))
    (g_ref_z, g_ref_v) = torch.autograd.grad((naive_fastweight(z, v, pos, 4, 0.3) * grad).sum(), (z, v))
    torch.testing.assert_close(g_scan_z, g_ref_z, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_scan_v, g_ref_v, rtol=1e-12, atol=1e-12)


def test_gradcheck_with_state_in_and_out():
    pos = packed_positions(3, 9)
    layout = build_layout(pos + 0, 4, continues_before=True, continues_after=True)
    z, v = random_inputs(1, 12, h=3, d=2, requires_grad=True)
    committed = torch.randn(1, 2, 3, dtype=F64, requires_grad=True)
    pending = torch.randn(1, 2, 3, dtype=F64, requires_grad=True)

    def run(z, v, committed, pending):
        out, (c, p) = chunk_scan(z, v, layout, 0.4, state=(committed, pending))
        return out, c, p

    assert torch.autograd.gradcheck(run, (z, v, committed, pending))


@pytest.mark.parametrize("lengths,split", [((21,), 8), ((3, 18), 8), ((8, 13), 8), ((5, 3, 13), 8), ((10, 11), 4)])
def test_state_passing_across_a_split_equals_the_whole(lengths, split):
    """What context parallelism relies on: scanning two shards with the state handed over at the
    boundary (including a chunk that straddles it) gives the outputs and gradients of one scan."""
    pos = packed_positions(*lengths)
    seq = pos.shape[1]
    z, v = random_inputs(1, seq, requires_grad=True)
    grad = torch.randn(1, seq, 5, dtype=F64)
    whole, _ = chunk_scan(z, v, build_layout(pos, 4), 0.6)
    first, state = chunk_scan(z[:, :split], v[:, :split], build_layout(pos[:, :split], 4, continues_after=True), 0.6)
    second, _ = chunk_scan(
        z[:, split:], v[:, split:], build_layout(pos[:, split:], 4, continues_before=True), 0.6, state=state
    )
    torch.testing.assert_close(torch.cat([first, second], dim=1), whole, rtol=1e-12, atol=1e-12)
    g_whole = torch.autograd.grad((whole * grad).sum(), (z, v))
    g_split = torch.autograd.grad((torch.cat([first, second], dim=1) * grad).sum(), (z, v))
    for a, b in zip(g_split, g_whole):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "lengths,offset",  # offset: the piece starts that far into its first document (a CP piece edge)
    [((16,), 0), ((19,), 2), ((3, 9, 1, 10), 0), ((6, 12), 3), ((5, 3), 1), ((2,), 0)],
)
def test_state_transfer_is_the_scans_final_state_without_its_reads(lengths, offset):
    """What CP sends first: the (committed, pending) state of a piece, equal to the chunk scan's, and so
    are its gradients."""
    pos = packed_positions(*lengths) + torch.cat([torch.full((lengths[0],), offset), torch.zeros(sum(lengths[1:]))])
    layout = build_layout(pos.long(), 4, continues_before=offset > 0, continues_after=True)
    z, v = random_inputs(1, pos.shape[1], requires_grad=True)
    _, scanned = chunk_scan(z, v, layout, 0.6)
    transfer = state_transfer(z, v, layout, 0.6)
    weights = [torch.randn_like(t) for t in scanned]
    for got, want in zip(transfer, scanned):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    g_scan = torch.autograd.grad(sum((t * w).sum() for t, w in zip(scanned, weights)), (z, v))
    g_transfer = torch.autograd.grad(sum((t * w).sum() for t, w in zip(transfer, weights)), (z, v))
    for got, want in zip(g_transfer, g_scan):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_low_precision_inputs_accumulate_in_fp32():
    z, v = random_inputs(1, 64, h=16, d=8, dtype=torch.float32)
    layout = build_layout(torch.arange(64), 8)
    out_bf16, (committed, _) = chunk_scan(z.bfloat16(), v.bfloat16(), layout, 0.1)
    assert out_bf16.dtype == torch.bfloat16 and committed.dtype == torch.float32
    exact = naive_fastweight(z.bfloat16().double(), v.bfloat16().double(), torch.arange(64), 8, 0.1)
    torch.testing.assert_close(out_bf16.double(), exact, rtol=1e-2, atol=1e-2)


def test_clip_scales_large_chunk_deltas_to_tau():
    delta = torch.randn(3, 4, 5, dtype=F64)
    delta[1] *= 1e-3
    clipped = clip_delta(delta, 0.5)
    norms = torch.linalg.matrix_norm(clipped)
    torch.testing.assert_close(norms[[0, 2]], torch.full((2,), 0.5, dtype=F64))
    torch.testing.assert_close(clipped[1], delta[1])
    pos = packed_positions(9, 14)
    z, v = random_inputs(1, 23)
    out, _ = chunk_scan(z, v, build_layout(pos, 4), 2.0, clip=0.5)
    torch.testing.assert_close(out, naive_fastweight(z, v, pos, 4, 2.0, clip=0.5), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(out, naive_fastweight(z, v, pos, 4, 2.0))


def test_clip_is_inference_only():
    z, v = random_inputs(1, 8, requires_grad=True)
    out, _ = chunk_scan(z, v, build_layout(torch.arange(8), 4), 1.0, clip=0.1)
    with pytest.raises(RuntimeError, match="inference-time"):
        out.sum().backward()


def test_scan_saves_no_per_chunk_weights():
    """Memory rule: the scan keeps only its inputs for backward, however many chunks there are."""
    saved = []

    def pack(t):
        saved.append(t.untyped_storage().nbytes())
        return t

    seq, h, d = 1024, 32, 16
    z, v = random_inputs(1, seq, h=h, d=d, dtype=torch.float32, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        chunk_scan(z, v, build_layout(torch.arange(seq), 4), 1.0)
    assert sum(saved) <= z.numel() * 4 + v.numel() * 4  # 256 chunks: per-chunk weights would be 256 * d * h
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        naive_fastweight(z, v, torch.arange(seq), 4, 1.0)
    assert sum(saved) >= (seq // 4) * d * h * 4  # the reference does materialize them


def test_document_ids_become_restarting_positions():
    ids = torch.tensor([[4, 4, 4, 9, 9, 2, 2, 2, 2]])
    assert document_position_ids(ids).tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3]]


def inconsistent_inputs() -> dict[str, tuple]:
    """(z, v, layout, state, the error's words) of inputs that do not fit each other (B=2, S=12, h=5, d=3); the
    Triton path is checked with the same ones under the interpreter (tests/test_scan_triton.py)."""
    z, v = torch.randn(2, 12, 5), torch.randn(2, 12, 3)
    layout = build_layout(torch.arange(12).expand(2, -1), 4)
    state = (torch.randn(2, 3, 5), torch.randn(2, 3, 5))
    return {
        "a state of batch 1": (z, v, layout, (state[0][:1], state[1][:1]), "incoming committed state must be"),
        "a state shaped (B, h, d)": (z, v, layout, (state[0].mT, state[1]), "must be (B, d, h) = (2, 3, 5)"),
        "v shorter than z": (z, v[:, :9], layout, None, "must have z's batch and length (2, 12)"),
        "a layout for a longer sequence": (
            z, v, build_layout(torch.arange(20).expand(2, -1), 4), None, "the layout describes (2, 20) positions"
        ),
        "a layout for one row": (z, v, build_layout(torch.arange(12)[None], 4), None, "describes (1, 12) positions"),
    }  # fmt: skip


@pytest.mark.parametrize("case", sorted(inconsistent_inputs()))
def test_inconsistent_inputs_are_one_clear_error(case):
    z, v, layout, state, message = inconsistent_inputs()[case]
    with pytest.raises(ValueError, match=re.escape(message)) as error:
        chunk_scan(z, v, layout, 1.0, None, state)
    assert "\n" not in str(error.value)
