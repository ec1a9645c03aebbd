"""The fused Soft Top-K kernels (kernels/soft_topk.py through ops.soft_topk) against reference.soft_topk.

The reference runs in float64 on the same (already rounded) scores; the kernels compute in fp32 and
return α and ∂L/∂scores in the input dtype. Tolerances per dtype:

* α (absolute, α ∈ [0, 1]):            fp32 2e-5, fp16 1e-3 (2 ulp at 1), bf16 8e-3 (2 ulp at 1)
* ∂L/∂scores (relative to max |ref|):  fp32 1e-4, fp16 4e-3, bf16 3e-2
* Σα = K (fp32):                       |Σα - K| <= 1e-4·K, also for N = 16,384 and τ = 0.05

block_n=32 makes every loop of the looped kernels run several times on the 130-token image;
block_n=None lets the launcher hold each image on chip (one block covers the batch's ΣN).
"""
import pytest
import torch

from autoselect_fast import ops
from autoselect_fast import reference as R
from autoselect_fast.ragged import cu_seqlens_from_lengths, segment_bounds

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ALPHA_ATOL = {torch.float32: 2e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
GRAD_RTOL = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}
F_CHOICES = ["laplace", "sigmoid"]
LENGTHS = [[1], [6], [1, 37, 130]]


def make_scores(lengths, dtype, device, *, seed=0, scale=1.5):
    gen = torch.Generator().manual_seed(seed)
    scores = (torch.randn(sum(lengths), generator=gen) * scale + 0.3).to(dtype)
    return scores.to(device), cu_seqlens_from_lengths(lengths).to(device)


def budgets(lengths, mode):
    if mode == "one":
        return torch.ones(len(lengths), dtype=torch.int64)
    if mode == "all":
        return torch.tensor(lengths)
    return torch.tensor([max(1, (n * (i + 2)) // 5) for i, n in enumerate(lengths)])


def run_both(scores, k, cu, *, tau, f, normalize=True, block_n=32, seed=1):
    """(α, grad) of the kernels and of the reference (float64) for one random upstream gradient."""
    gen = torch.Generator().manual_seed(seed)
    upstream = torch.randn(scores.shape[0], generator=gen).to(scores.dtype)
    s = scores.detach().clone().requires_grad_(True)
    alpha = ops.soft_topk(s, k, cu, tau=tau, f=f, normalize=normalize, backend="triton", block_n=block_n)
    alpha.backward(upstream.to(alpha.device))
    s_ref = scores.detach().cpu().double().requires_grad_(True)
    alpha_ref = R.soft_topk(s_ref, k.cpu() if isinstance(k, torch.Tensor) else k, cu.cpu(), tau=tau, f=f, normalize=normalize)
    alpha_ref.backward(upstream.double())
    return alpha.detach().cpu(), s.grad.cpu(), alpha_ref.detach(), s_ref.grad


def assert_close(alpha, grad, alpha_ref, grad_ref, dtype):
    assert alpha.dtype == dtype and grad.dtype == dtype
    assert torch.isfinite(alpha).all() and torch.isfinite(grad).all()
    assert (alpha.double() - alpha_ref).abs().max().item() <= ALPHA_ATOL[dtype]
    grad_err = (grad.double() - grad_ref).abs().max().item()
    assert grad_err <= GRAD_RTOL[dtype] * max(1.0, grad_ref.abs().max().item()), grad_err


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("f", F_CHOICES)
@pytest.mark.parametrize("lengths", LENGTHS, ids=str)
@pytest.mark.parametrize("block_n", [32, None], ids=["looped", "on_chip"])
def test_soft_topk_matches_reference(kernel_device, dtype, f, lengths, block_n):
    scores, cu = make_scores(lengths, dtype, kernel_device)
    k = budgets(lengths, "mid").to(kernel_device)
    assert_close(*run_both(scores, k, cu, tau=0.5, f=f, block_n=block_n), dtype)


@pytest.mark.parametrize("f", F_CHOICES)
@pytest.mark.parametrize("tau", [2.0, 0.05])
@pytest.mark.parametrize("k_mode", ["one", "all", "last"])
def test_soft_topk_tau_and_extreme_budgets(kernel_device, f, tau, k_mode):
    lengths = [1, 37, 130]
    scores, cu = make_scores(lengths, torch.float32, kernel_device, seed=2)
    k = (budgets(lengths, "all") - 1).clamp(min=1) if k_mode == "last" else budgets(lengths, k_mode)
    alpha, grad, alpha_ref, grad_ref = run_both(scores, k.to(kernel_device), cu, tau=tau, f=f, block_n=None if tau < 1 else 32)
    assert_close(alpha, grad, alpha_ref, grad_ref, torch.float32)
    if k_mode == "all":  # K = N: α ≡ 1 and no gradient
        assert torch.equal(alpha, torch.ones_like(alpha)) and torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("f", F_CHOICES)
def test_soft_topk_without_normalisation(kernel_device, f):
    lengths = [6, 70]
    scores, cu = make_scores(lengths, torch.float32, kernel_device, seed=3, scale=4.0)
    k = torch.tensor([2, 17], device=kernel_device)
    assert_close(*run_both(scores, k, cu, tau=0.7, f=f, normalize=False), torch.float32)


@pytest.mark.parametrize("f", F_CHOICES)
@pytest.mark.parametrize("block_n, k", [(1024, 1_638), (None, 1_638), (None, 1)], ids=["looped", "on_chip", "on_chip-k1"])
def test_soft_topk_budget_holds_for_large_n_small_tau_and_an_outlier(kernel_device, f, block_n, k):
    """N = 16,384 (1,024-token blocks, or all on chip), τ = 0.05 and an outlier that puts |x| near 2,000."""
    n = 16_384
    scores, cu = make_scores([n], torch.float32, kernel_device, seed=4)
    scores[5] = 150.0
    alpha, grad, alpha_ref, grad_ref = run_both(scores, torch.tensor([k], device=kernel_device), cu, tau=0.05, f=f, block_n=block_n)
    assert abs(alpha.double().sum().item() - k) <= 1e-4 * k
    assert_close(alpha, grad, alpha_ref, grad_ref, torch.float32)


@pytest.mark.parametrize("f", F_CHOICES)
@pytest.mark.parametrize("spread", [2e3, 2e4, 1e5], ids=["x2e3", "x2e4", "x1e5"])
@pytest.mark.parametrize("block_n", [64, None], ids=["looped", "on_chip"])
def test_soft_topk_raw_scores_over_a_wide_range(kernel_device, f, spread, block_n):
    """normalize=False on raw scores with max |x| = max |s|/τ = 2e3, 2e4, 1e5 (spread far wider than one
    step of the solve): α and ∂L/∂s at the fp32 tolerances of the float64 reference, Σα = K per image.

    Budgets N - 1, 1 and 50 put the threshold at the bottom, at the top and inside a cluster of 100
    scores within ±3 of x = 0.9·spread (where one fp32 ulp of x is 1e-4 to 8e-3: the cluster's α needs
    x - λ to fp32 precision, not x)."""
    lengths = [41, 300, 1000]
    tau = 0.05
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(sum(lengths), generator=gen, dtype=torch.float64)
    x = x / x.abs().max() * spread
    x[-100:] = 0.9 * spread + 6.0 * (torch.rand(100, generator=gen, dtype=torch.float64) - 0.5)
    scores = (x * tau).float().to(kernel_device)
    cu = cu_seqlens_from_lengths(lengths).to(kernel_device)
    k = torch.tensor([40, 1, 50], device=kernel_device)
    alpha, grad, alpha_ref, grad_ref = run_both(scores, k, cu, tau=tau, f=f, normalize=False, block_n=block_n)
    assert_close(alpha, grad, alpha_ref, grad_ref, torch.float32)
    for (start, end), kk in zip(segment_bounds(cu.cpu()), k.tolist()):
        assert abs(alpha[start:end].double().sum().item() - kk) <= 1e-4 * kk


@pytest.mark.parametrize("f", F_CHOICES)
@pytest.mark.parametrize("block_n", [64, None], ids=["looped", "on_chip"])
def test_soft_topk_raw_scores_clustered_far_from_zero(kernel_device, f, block_n):
    """normalize=False, scores 5,000 + 0.05·randn at τ = 0.05: x ≈ 1e5 ± 3, where one fp32 ulp of x is
    0.008 but the α of the float64 reference spans (0, 1). The kernel must not lose the spread."""
    lengths = [200, 33]
    gen = torch.Generator().manual_seed(12)
    scores = (5e3 + 0.05 * torch.randn(sum(lengths), generator=gen, dtype=torch.float64)).float()
    scores[200:] -= 1e4  # the second image sits at x ≈ -1e5
    cu = cu_seqlens_from_lengths(lengths)
    k = torch.tensor([20, 30])
    scores, k, cu = scores.to(kernel_device), k.to(kernel_device), cu.to(kernel_device)
    alpha, grad, alpha_ref, grad_ref = run_both(scores, k, cu, tau=0.05, f=f, normalize=False, block_n=block_n)
    assert 0.05 < alpha_ref[:200].max() - alpha_ref[:200].min() < 1  # the reference's α is not saturated
    assert_close(alpha, grad, alpha_ref, grad_ref, torch.float32)


@pytest.mark.parametrize("f", F_CHOICES)
def test_soft_topk_sum_is_k_per_image(kernel_device, f):
    lengths = [3, 50, 129]
    scores, cu = make_scores(lengths, torch.float32, kernel_device, seed=5)
    k = torch.tensor([2, 1, 100], device=kernel_device)
    alpha = ops.soft_topk(scores, k, cu, tau=0.1, f=f, backend="triton", block_n=32).cpu().double()
    for (start, end), kk in zip(segment_bounds(cu.cpu()), k.tolist()):
        assert abs(alpha[start:end].sum().item() - kk) <= 1e-4 * kk


@pytest.mark.parametrize("f", F_CHOICES)
def test_soft_topk_constant_scores(kernel_device, f):
    """Zero variance: ŝ = 0 everywhere (eps keeps it finite), so α = K/N and the gradient is finite."""
    scores = torch.full((40,), 3.0, device=kernel_device)
    alpha, grad, alpha_ref, grad_ref = run_both(scores, torch.tensor([10], device=kernel_device), torch.tensor([0, 40], device=kernel_device), tau=0.3, f=f)
    assert torch.allclose(alpha.double(), torch.full((40,), 0.25, dtype=torch.float64), atol=2e-5)
    assert_close(alpha, grad, alpha_ref, grad_ref, torch.float32)


def test_soft_topk_auto_backend_and_int_k(kernel_device):
    scores, cu = make_scores([9, 20], torch.float32, kernel_device)
    assert ops.resolve_backend("auto", kernel_device) == "triton"
    auto = ops.soft_topk(scores, 3, cu, tau=0.4)
    ref = ops.soft_topk(scores, torch.tensor([3, 3], dtype=torch.int32), cu, tau=0.4, backend="reference")
    assert torch.allclose(auto.cpu(), ref.cpu(), atol=2e-5)


def test_soft_topk_argument_errors(kernel_device):
    scores, cu = make_scores([6, 4], torch.float32, kernel_device)
    with pytest.raises(ValueError, match="k must satisfy"):
        ops.soft_topk(scores, 0, cu)
    with pytest.raises(ValueError, match="k must satisfy"):
        ops.soft_topk(scores, torch.tensor([3, 5]), cu)
    with pytest.raises(ValueError, match="k must have shape"):
        ops.soft_topk(scores, torch.tensor([3, 3, 3]), cu)
    with pytest.raises(ValueError, match="tau must be a finite number > 0"):
        ops.soft_topk(scores, 2, cu, tau=0.0)
    with pytest.raises(TypeError, match="tau must be a float"):
        ops.soft_topk(scores, 2, cu, tau="1")
    with pytest.raises(ValueError, match="f must be one of"):
        ops.soft_topk(scores, 2, cu, f="softmax")
    with pytest.raises(TypeError, match="normalize must be a bool"):
        ops.soft_topk(scores, 2, cu, normalize=1)
    with pytest.raises(TypeError, match="scores must have dtype"):
        ops.soft_topk(scores.int(), 2, cu)
    with pytest.raises(ValueError, match="scores must have 1 dimension"):
        ops.soft_topk(scores[None], 2, cu)
    with pytest.raises(ValueError, match="scores must be finite"):
        ops.soft_topk(torch.full_like(scores, float("inf")), 2, cu)
    with pytest.raises(ValueError, match=r"cu_seqlens\[-1\] must equal"):
        ops.soft_topk(scores, 2, torch.tensor([0, 6, 11]))
    with pytest.raises(ValueError, match="scores must be contiguous"):
        ops.soft_topk(torch.stack([scores, scores], 1)[:, 1], 2, cu, backend="triton")
    with pytest.raises(ValueError, match="block_n must be a power of two"):
        ops.soft_topk(scores, 2, cu, block_n=100)


@pytest.mark.parametrize("f", F_CHOICES)
def test_soft_topk_fp32_small_spread_on_a_large_offset(kernel_device, f):
    """Scores 1e4 + 0.003·randn (a spread of ~3 fp32 ulps at 1e4): the kernel's fp32 mean/variance must
    not lose it. α within 1e-5 of the float64 reference on the same fp32 scores, two images (the second
    one starts away from its own first score)."""
    lengths = [300, 45]
    gen = torch.Generator().manual_seed(6)
    scores = (1e4 + 0.003 * torch.randn(sum(lengths), generator=gen, dtype=torch.float64)).float()
    scores[300:] -= 2e3
    cu = cu_seqlens_from_lengths(lengths)
    k = torch.tensor([30, 44])
    for block_n in (128, None):  # looped, and on chip
        alpha, grad, alpha_ref, grad_ref = run_both(scores.to(kernel_device), k.to(kernel_device), cu.to(kernel_device), tau=0.5, f=f, block_n=block_n)
        assert (alpha.double() - alpha_ref).abs().max().item() <= 1e-5
        # ∂L/∂s scales with 1/std ~ 300: compare relative to its size.
        assert (grad.double() - grad_ref).abs().max().item() <= 1e-3 * grad_ref.abs().max().item()
