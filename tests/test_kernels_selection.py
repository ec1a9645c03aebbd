"""The selection kernel (kernels/selection.py through ops.select) against reference.select_tokens.

Tolerance, every dtype (fp32, fp16, bf16, and fp64 scores): none. Selection is exact: the same
indices, the same rows bit-for-bit, the same position ids and offsets.

Small tiles (block_n=32) make the looped kernel's radix passes and emit loop run more than once on the
130-token image; default tiles (TILES "on_chip") hold each image's keys in registers. block_d=8 on
20-wide features gives three column programs per kept-row block of the gather (test_select_column_programs).
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from autoselect_fast import ops
from autoselect_fast import reference as R
from autoselect_fast.ragged import cu_seqlens_from_lengths

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LENGTHS = [[1], [5], [1, 37, 130]]
SMALL = dict(block_n=32, block_d=32)
TILES = pytest.mark.parametrize("tiles", [SMALL, {}], ids=["looped", "on_chip"])


def make_inputs(lengths, dtype, device, *, d=20, seed=0, ties=False):
    gen = torch.Generator().manual_seed(seed)
    n = sum(lengths)
    scores = torch.randn(n, generator=gen)
    if ties:  # few distinct values, and -0.0 next to +0.0
        scores = (scores * 2).round() / 2
        scores[::7] = -0.0
    features = torch.randn(n, d, generator=gen).to(dtype)
    return scores.to(dtype).to(device), features.to(device), cu_seqlens_from_lengths(lengths).to(device)


def budgets(lengths, mode):
    if mode == "one":
        return torch.ones(len(lengths), dtype=torch.int64)
    if mode == "all":
        return torch.tensor(lengths)
    return torch.tensor([max(1, (n * (i + 1)) // 4) for i, n in enumerate(lengths)])


def assert_same_selection(got: R.Selection, want: R.Selection):
    assert torch.equal(got.indices.cpu(), want.indices.cpu())
    assert got.indices.dtype == torch.int64
    if want.features is None:
        assert got.features is None
    else:
        assert got.features.dtype == want.features.dtype
        assert torch.equal(got.features.cpu(), want.features.cpu())
    assert got.position_ids.dtype == torch.int64
    assert torch.equal(got.position_ids.cpu(), want.position_ids.cpu())
    assert torch.equal(got.cu_seqlens.cpu(), want.cu_seqlens.cpu())


def reference_on_cpu(scores, features, k, cu, **kw):
    cpu = lambda t: None if t is None else t.cpu()  # noqa: E731
    kw = {key: cpu(v) if isinstance(v, torch.Tensor) else v for key, v in kw.items()}
    return R.select_tokens(cpu(scores), cpu(features), k, cpu(cu), **kw)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lengths", LENGTHS, ids=str)
@pytest.mark.parametrize("k_mode", ["one", "mid", "all"])
@TILES
def test_select_matches_reference(kernel_device, dtype, lengths, k_mode, tiles):
    scores, features, cu = make_inputs(lengths, dtype, kernel_device)
    k = budgets(lengths, k_mode).to(kernel_device)
    got = ops.select(scores, features, k, cu, backend="triton", **tiles)
    assert_same_selection(got, reference_on_cpu(scores, features, k, cu))


@pytest.mark.parametrize("position_mode", ["original", "compact"])
@pytest.mark.parametrize("pos_kind", ["default", "1d", "3d", "3d_int32"])
def test_select_positions(kernel_device, position_mode, pos_kind):
    lengths = [1, 37, 130]
    scores, features, cu = make_inputs(lengths, torch.float32, kernel_device, seed=1)
    n = sum(lengths)
    gen = torch.Generator().manual_seed(2)
    positions = {
        "default": None,
        "1d": torch.randint(0, 10_000, (n,), generator=gen),
        "3d": torch.randint(0, 10_000, (3, n), generator=gen),
        "3d_int32": torch.randint(0, 10_000, (3, n), generator=gen, dtype=torch.int32),
    }[pos_kind]
    positions = None if positions is None else positions.to(kernel_device)
    k = torch.tensor([1, 9, 50])
    got = ops.select(scores, features, k, cu, positions=positions, position_mode=position_mode, backend="triton", **SMALL)
    want = reference_on_cpu(scores, features, k, cu, positions=positions, position_mode=position_mode)
    assert_same_selection(got, want)
    assert got.position_ids.shape == ((3, 60) if pos_kind.startswith("3d") else (60,))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@TILES
def test_select_ties_go_to_the_lower_index(kernel_device, dtype, tiles):
    lengths = [40, 33]
    scores, features, cu = make_inputs(lengths, dtype, kernel_device, seed=3, ties=True)
    for k in (1, 5, 17, 33):
        got = ops.select(scores, features, k, cu, backend="triton", **tiles)
        assert_same_selection(got, reference_on_cpu(scores, features, k, cu))


@pytest.mark.parametrize("position_mode", ["original", "compact"])
def test_select_column_programs(kernel_device, position_mode):
    """Several programs per image (one per 8 feature columns) write disjoint columns of the same rows."""
    lengths = [1, 37, 130]
    scores, features, cu = make_inputs(lengths, torch.bfloat16, kernel_device, seed=6)
    positions = torch.randint(0, 500, (3, sum(lengths))).to(kernel_device)
    k = torch.tensor([1, 10, 33])
    got = ops.select(scores, features, k, cu, positions=positions, position_mode=position_mode, backend="triton", block_n=32, block_d=8)
    assert_same_selection(got, reference_on_cpu(scores, features, k, cu, positions=positions, position_mode=position_mode))


def test_select_constant_scores_keep_the_first_k(kernel_device):
    scores = torch.full((50,), 0.25, device=kernel_device)
    got = ops.select(scores, None, 7, backend="triton", **SMALL)
    assert got.indices.cpu().tolist() == list(range(7))
    assert got.features is None


def test_select_default_tiles_and_large_image(kernel_device):
    """Default tile sizes: both images on chip (one 2,048-token block), and a 16-row gather block."""
    lengths = [1000, 576]
    scores, features, cu = make_inputs(lengths, torch.float16, kernel_device, d=160, seed=4)
    k = torch.tensor([64, 64], device=kernel_device)
    got = ops.select(scores, features, k, cu, backend="triton")
    assert_same_selection(got, reference_on_cpu(scores, features, k, cu))


def test_select_int_k_and_no_cu_seqlens(kernel_device):
    scores, features, _ = make_inputs([23], torch.float32, kernel_device, seed=5)
    got = ops.select(scores, features, 4, backend="triton", **SMALL)
    assert_same_selection(got, reference_on_cpu(scores, features, 4, None))
    got32 = ops.select(scores, features, torch.tensor([4], dtype=torch.int32, device=kernel_device), backend="triton")
    assert_same_selection(got32, got)


def test_select_auto_backend_uses_the_kernels(kernel_device):
    assert ops.resolve_backend("auto", kernel_device) == "triton"
    scores, features, cu = make_inputs([9, 4], torch.float32, kernel_device)
    assert_same_selection(ops.select(scores, features, 3, cu), ops.select(scores, features, 3, cu, backend="reference"))


def test_select_argument_errors(kernel_device):
    scores, features, cu = make_inputs([6, 4], torch.float32, kernel_device)
    with pytest.raises(ValueError, match="k must satisfy"):
        ops.select(scores, features, 0, cu)
    with pytest.raises(ValueError, match="k must satisfy"):
        ops.select(scores, features, torch.tensor([6, 5]), cu)
    with pytest.raises(TypeError, match="k must be"):
        ops.select(scores, features, 2.5, cu)
    with pytest.raises(ValueError, match="position_mode"):
        ops.select(scores, features, 2, cu, position_mode="packed")
    with pytest.raises(ValueError, match="features must have 10 rows"):
        ops.select(scores, features[:9], 2, cu)
    with pytest.raises(ValueError, match="positions must have shape"):
        ops.select(scores, features, 2, cu, positions=torch.zeros(2, 10, dtype=torch.int64, device=kernel_device))
    with pytest.raises(TypeError, match="positions must have dtype"):
        ops.select(scores, features, 2, cu, positions=torch.zeros(10, device=kernel_device))
    with pytest.raises(TypeError, match="scores must have dtype"):
        ops.select(scores.long(), features, 2, cu)
    with pytest.raises(ValueError, match="scores must be finite"):
        ops.select(torch.where(scores > 0, float("nan"), scores), features, 2, cu)
    with pytest.raises(ValueError, match="cu_seqlens"):
        ops.select(scores, features, 2, torch.tensor([0, 6, 9], device=kernel_device))
    with pytest.raises(ValueError, match="features must have stride 1"):
        ops.select(scores, features.t().contiguous().t(), 2, cu, backend="triton")
    with pytest.raises(ValueError, match="scores must be contiguous"):
        ops.select(torch.stack([scores, scores], 1)[:, 0], features, 2, cu, backend="triton")
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.select(scores, features, 2, cu, backend="cuda")
    with pytest.raises(ValueError, match="block_n must be a power of two"):
        ops.select(scores, features, 2, cu, block_n=24)


def test_dispatch_without_the_interpreter_falls_back_to_the_reference():
    """CPU tensors without TRITON_INTERPRET: "auto" runs the reference path, "triton" is refused."""
    script = textwrap.dedent(
        """
        import torch
        from autoselect_fast import ops, reference as R
        cpu = torch.device("cpu")
        assert ops.resolve_backend("auto", cpu) == "reference"
        scores = torch.randn(30)
        got = ops.select(scores, None, 4)
        assert torch.equal(got.indices, R.select_tokens(scores, None, 4).indices)
        x, alpha = torch.randn(5, 6), torch.rand(5)
        assert torch.equal(ops.vp_gate(x, alpha, seed=3), ops.vp_gate(x, alpha, seed=3))
        try:
            ops.soft_topk(scores, 4, backend="triton")
        except ValueError as err:
            assert "backend='triton' cannot run on device cpu" in str(err), err
        else:
            raise AssertionError("backend='triton' ran without CUDA or the interpreter")
        """
    )
    env = {**os.environ, "TRITON_INTERPRET": "0", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
