"""autoselect_fast.ragged: cu_seqlens helpers and the packed <-> padded layouts, against plain loops."""
import pytest
import torch

from autoselect_fast.ragged import (
    cu_seqlens_from_lengths,
    lengths_from_cu_seqlens,
    packed_to_padded,
    padded_to_packed,
    segment_bounds,
    single_segment_cu,
    to_device,
)

LENGTHS = [5, 2, 3]


def loop_padded(packed, lengths, *, dim, pad_value, side, longest):
    """The packed -> padded layout written as a loop over segments (the spec of packed_to_padded)."""
    rows = packed.movedim(dim, 0)
    out = torch.full((len(lengths), longest, *rows.shape[1:]), pad_value, dtype=packed.dtype)
    start = 0
    for i, n in enumerate(lengths):
        first = 0 if side == "right" else longest - n
        out[i, first:first + n] = rows[start:start + n]
        start += n
    return out.movedim((0, 1), (dim % packed.dim(), dim % packed.dim() + 1))


def test_offsets_and_bounds():
    cu = cu_seqlens_from_lengths(LENGTHS)
    assert cu.dtype == torch.int64 and cu.tolist() == [0, 5, 7, 10]
    assert lengths_from_cu_seqlens(cu).tolist() == LENGTHS
    assert segment_bounds(cu) == [(0, 5), (5, 7), (7, 10)]
    assert single_segment_cu(7).tolist() == [0, 7]
    host = torch.tensor([1, 2])
    assert to_device(host, torch.device("cpu")) is host  # already there: no copy


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("shape, dim", [((10,), 0), ((10, 4), 0), ((3, 10), -1), ((2, 10, 3), 1)], ids=str)
def test_packed_to_padded_matches_the_loop(side, shape, dim):
    packed = torch.arange(torch.Size(shape).numel(), dtype=torch.float32).reshape(shape)
    cu = cu_seqlens_from_lengths(LENGTHS)
    got = packed_to_padded(packed, cu, dim=dim, pad_value=-1, side=side)
    assert torch.equal(got, loop_padded(packed, LENGTHS, dim=dim, pad_value=-1, side=side, longest=5))
    wider = packed_to_padded(packed, cu, dim=dim, side=side, max_len=7)  # a given width, no host read
    assert torch.equal(wider, loop_padded(packed, LENGTHS, dim=dim, pad_value=0, side=side, longest=7))


def test_packed_to_padded_keeps_integer_dtypes_and_int32_offsets():
    labels = torch.tensor([1, 2, 3, 4, 5, 6, 7, 8, 9, 10])
    got = packed_to_padded(labels, cu_seqlens_from_lengths(LENGTHS).to(torch.int32), pad_value=-100)
    assert got.dtype == torch.int64
    assert got.tolist() == [[1, 2, 3, 4, 5], [6, 7, -100, -100, -100], [8, 9, 10, -100, -100]]


def test_packed_padded_round_trip():
    padded = torch.randn(3, 5, 2)
    packed, cu = padded_to_packed(padded, LENGTHS)
    assert cu.tolist() == [0, 5, 7, 10] and packed.shape == (10, 2)
    back = packed_to_padded(packed, cu)
    for i, n in enumerate(LENGTHS):
        assert torch.equal(back[i, :n], padded[i, :n])
        assert torch.equal(back[i, n:], torch.zeros(5 - n, 2))
    every, full_cu = padded_to_packed(padded)
    assert torch.equal(every, padded.reshape(15, 2)) and full_cu.tolist() == [0, 5, 10, 15]


def test_bad_arguments_get_clear_errors():
    cu = cu_seqlens_from_lengths(LENGTHS)
    with pytest.raises(ValueError, match="side must be one of"):
        packed_to_padded(torch.zeros(10), cu, side="middle")
    with pytest.raises(ValueError, match="dim must index one of the 1 dimensions"):
        packed_to_padded(torch.zeros(10), cu, dim=1)
    with pytest.raises(ValueError, match=r"lengths must have shape \(3,\) with 1 <= lengths <= 5"):
        padded_to_packed(torch.zeros(3, 5), [5, 6, 1])
    with pytest.raises(ValueError, match="padded must be a tensor of 2 or 3 dimensions"):
        padded_to_packed(torch.zeros(5))
