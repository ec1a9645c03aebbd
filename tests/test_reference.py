"""The reference path checked against the design's math (docs/design.md, "The math" and "Position ids").

The reference is what every kernel is tested against, so here it is tested against independent
oracles: autograd's numerical gradients, sorting, torch.topk and the defining equations.

Private names used here: this file is the unit test of the reference's private Laplace CDF (``_cdf``).
"""
import math

import pytest
import torch

from autoselect_fast import reference as R
from autoselect_fast.ragged import cu_seqlens_from_lengths, segment_bounds

F_CHOICES = ["laplace", "sigmoid"]


def ragged(lengths, seed=0, scale=1.0, offset=0.0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(sum(lengths), generator=gen, dtype=torch.float64) * scale + offset
    return scores.to(dtype), cu_seqlens_from_lengths(lengths)


# ------------------------------------------------------------------------------------------ normalise
def test_normalize_scores_is_a_per_image_zscore():
    scores, cu = ragged([5, 1, 12], scale=3.0, offset=7.0)
    s_hat = R.normalize_scores(scores, cu)
    for start, end in segment_bounds(cu):
        seg = s_hat[start:end]
        assert abs(float(seg.mean())) < 1e-12
        if end - start > 1:  # population variance, shrunk by eps
            expected_var = float(scores[start:end].var(unbiased=False))
            assert float(seg.var(unbiased=False)) == pytest.approx(expected_var / (expected_var + R.NORM_EPS), rel=1e-12)
    assert float(s_hat[5]) == 0.0  # a one-token image normalises to 0


# --------------------------------------------------------------------------------------- soft top-K
@pytest.mark.parametrize("f", F_CHOICES)
def test_soft_topk_gradcheck_including_normalisation(f):
    scores, cu = ragged([7, 4, 9], seed=1)
    scores.requires_grad_(True)
    k = torch.tensor([3, 1, 8])
    assert torch.autograd.gradcheck(lambda s: R.soft_topk(s, k, cu, tau=0.7, f=f), (scores,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("f", F_CHOICES)
def test_soft_topk_gradcheck_without_normalisation(f):
    scores, cu = ragged([6, 5], seed=2)
    scores.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda s: R.soft_topk(s, 2, cu, tau=1.3, f=f, normalize=False), (scores,), eps=1e-6, atol=1e-6)


def test_laplace_threshold_solves_the_defining_equation():
    gen = torch.Generator().manual_seed(3)
    for n, k in [(1, 1), (2, 1), (9, 4), (100, 99), (300, 17)]:
        x = torch.randn(n, generator=gen, dtype=torch.float64) * 4
        lam = R.laplace_threshold(x, k)
        if k == n:
            assert lam == -math.inf
            continue
        # Σ F(x - λ) = K, and the sigmoid/Laplace solutions are monotone in K.
        assert float(R._cdf(x - lam, "laplace").sum()) == pytest.approx(k, abs=1e-10)
        assert R.laplace_threshold(x, max(k - 1, 1)) >= lam


# Budget sweep: N from 1 to 20,000, K from 1 to N, τ from 0.05 to 5, scores with large offsets and
# scales (1e4); Σα must equal K within 1e-4·K and nothing may be NaN or inf, forward or backward.
SWEEP_N = [1, 2, 3, 17, 576, 2049, 20000]


def _budgets(n):
    return sorted({1, max(1, n // 3), max(1, n - 1), n})


@pytest.mark.parametrize("f", F_CHOICES)
@pytest.mark.parametrize("n", SWEEP_N)
def test_soft_topk_budget_is_exact_and_finite(f, n):
    gen = torch.Generator().manual_seed(n)
    for tau in (0.05, 1.0, 5.0):
        for scale, offset in ((1.0, 0.0), (1e4, 1e4), (1e-4, -1e4)):
            scores = (torch.randn(n, generator=gen, dtype=torch.float64) * scale + offset).requires_grad_(True)
            for k in _budgets(n):
                alpha = R.soft_topk(scores, k, tau=tau, f=f)
                assert torch.isfinite(alpha).all()
                assert ((alpha >= 0) & (alpha <= 1)).all()
                assert abs(float(alpha.detach().sum()) - k) <= 1e-4 * k, (n, k, tau, scale)
                (grad,) = torch.autograd.grad((alpha * torch.randn(n, generator=gen, dtype=torch.float64)).sum(), scores)
                assert torch.isfinite(grad).all(), (n, k, tau, scale)


@pytest.mark.parametrize("f", F_CHOICES)
def test_soft_topk_handles_ties_and_constant_scores(f):
    alpha = R.soft_topk(torch.full((5,), 3.0, dtype=torch.float64), 2, tau=0.1, f=f)
    torch.testing.assert_close(alpha, torch.full((5,), 0.4, dtype=torch.float64), rtol=0, atol=1e-9)
    tied = torch.tensor([1.0, 2.0, 2.0, 0.0], dtype=torch.float64)
    alpha = R.soft_topk(tied, 1, tau=0.2, f=f)
    assert float(alpha[1]) == pytest.approx(float(alpha[2]), abs=1e-12)
    assert float(alpha.sum()) == pytest.approx(1.0, abs=1e-9)


def test_soft_topk_k_equal_n_is_all_ones_with_zero_gradient():
    scores = torch.randn(6, dtype=torch.float64, requires_grad=True)
    alpha = R.soft_topk(scores, 6, tau=0.5)
    assert torch.equal(alpha, torch.ones(6, dtype=torch.float64))
    alpha.sum().backward()
    assert torch.equal(scores.grad, torch.zeros(6, dtype=torch.float64))


@pytest.mark.parametrize("f", F_CHOICES)
def test_soft_topk_converges_to_hard_topk_as_tau_goes_to_zero(f):
    gen = torch.Generator().manual_seed(4)
    lengths, ks = [20, 13], torch.tensor([5, 6])
    scores = torch.cat([torch.randperm(n, generator=gen).double() for n in lengths])  # distinct scores
    cu = cu_seqlens_from_lengths(lengths)
    indices, _ = R.hard_topk_indices(scores, ks, cu)
    hard = torch.zeros_like(scores)
    hard[indices] = 1.0
    errors = [float((R.soft_topk(scores, ks, cu, tau=tau, f=f) - hard).abs().max()) for tau in (1.0, 0.1, 0.01, 0.002)]
    assert errors == sorted(errors, reverse=True)
    assert errors[-1] < 1e-6


def test_soft_topk_keeps_input_dtype():
    scores = torch.randn(10, dtype=torch.float32)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        assert R.soft_topk(scores.to(dtype), 3, tau=0.5).dtype == dtype


# ------------------------------------------------------------------------------------------ VP gate
def test_vp_gate_gradcheck():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 5, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    alpha = (torch.rand(2, 5, generator=gen, dtype=torch.float64) * 0.9 + 0.05).requires_grad_(True)
    noise = torch.randn(2, 5, 3, generator=gen, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a, b: R.vp_gate(a, b, noise), (x, alpha))


def test_vp_gate_endpoints_and_guarded_derivative():
    x, noise = torch.randn(4, 8, dtype=torch.float64), torch.randn(4, 8, dtype=torch.float64)
    alpha = torch.tensor([0.0, 1.0, 0.0, 1.0], dtype=torch.float64, requires_grad=True)
    out = R.vp_gate(x, alpha, noise)
    torch.testing.assert_close(out[0], noise[0], rtol=0, atol=0)
    torch.testing.assert_close(out[1], x[1], rtol=0, atol=0)
    out.sum().backward()
    assert torch.isfinite(alpha.grad).all()


def test_vp_gate_preserves_variance_of_standardised_inputs():
    # x ~ N(0, 1) and ε ~ N(0, 1) independent => Var(√α x + √(1-α) ε) = 1 for every α.
    # 2·10^5 samples: the standard error of the variance is ~0.003; the tolerance is 0.02 (~6 s.e.).
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(2000, 100, generator=gen, dtype=torch.float64)
    alpha = torch.rand(2000, generator=gen, dtype=torch.float64)
    out = R.vp_gate(x, alpha, generator=gen)
    assert abs(float(out.var()) - 1.0) < 0.02
    assert abs(float(out.mean())) < 0.01
    # also within groups of tokens whose α is small, medium and large
    for lo, hi in ((0.0, 0.2), (0.4, 0.6), (0.8, 1.0)):
        rows = (alpha >= lo) & (alpha < hi)
        assert abs(float(out[rows].var()) - 1.0) < 0.05


def test_vp_gate_generator_makes_it_deterministic():
    x, alpha = torch.randn(3, 4), torch.rand(3)
    a = R.vp_gate(x, alpha, generator=torch.Generator().manual_seed(0))
    b = R.vp_gate(x, alpha, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)


# ----------------------------------------------------------------------------------- hard selection
def _oracle_topk(scores, k):
    """Sort by (-score, index): the K best with ties to the lower index, then ascending."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return sorted(order[:k])


def test_hard_topk_matches_torch_topk_without_ties():
    scores, cu = ragged([576, 33, 1], seed=7, dtype=torch.float32)
    ks = torch.tensor([64, 33, 1])
    indices, kept_cu = R.hard_topk_indices(scores, ks, cu)
    assert kept_cu.tolist() == [0, 64, 97, 98]
    for (s, e), (ks_, ke) in zip(segment_bounds(cu), segment_bounds(kept_cu)):
        expected = torch.sort(torch.topk(scores[s:e], ke - ks_).indices).values + s
        assert torch.equal(indices[ks_:ke], expected)


def test_hard_topk_ties_go_to_the_lower_index():
    gen = torch.Generator().manual_seed(8)
    scores = torch.randint(0, 4, (40,), generator=gen).float()  # many ties
    for k in (1, 5, 17, 40):
        indices, _ = R.hard_topk_indices(scores, k)
        assert indices.tolist() == _oracle_topk(scores.tolist(), k)


def test_select_tokens_gathers_rows_and_positions():
    scores = torch.tensor([0.1, 0.9, 0.5, 0.7, 0.2, 0.3, 0.8])
    features = torch.arange(7 * 2, dtype=torch.float32).view(7, 2)
    cu = torch.tensor([0, 4, 7])
    positions = torch.tensor([10, 11, 12, 13, 40, 41, 42])  # images start at positions 10 and 40
    sel = R.select_tokens(scores, features, torch.tensor([2, 1]), cu, positions=positions)
    assert sel.indices.tolist() == [1, 3, 6]
    assert torch.equal(sel.features, features[[1, 3, 6]])
    assert sel.position_ids.tolist() == [11, 13, 42]
    assert sel.cu_seqlens.tolist() == [0, 2, 3]
    compact = R.select_tokens(scores, features, torch.tensor([2, 1]), cu, positions=positions, position_mode="compact")
    assert compact.position_ids.tolist() == [10, 11, 40]
    default = R.select_tokens(scores, None, torch.tensor([2, 1]), cu)
    assert default.features is None and default.position_ids.tolist() == [1, 3, 2]


def test_select_tokens_mrope_positions_are_gathered_columns():
    scores = torch.tensor([0.3, 0.1, 0.9, 0.4])
    mrope = torch.tensor([[5, 5, 5, 5], [5, 5, 6, 6], [5, 6, 5, 6]])  # (t, h, w) of a 2x2 grid at offset 5
    sel = R.select_tokens(scores, None, 2, positions=mrope)
    assert sel.indices.tolist() == [2, 3]
    assert torch.equal(sel.position_ids, mrope[:, [2, 3]])
    compact = R.select_tokens(scores, None, 2, positions=mrope, position_mode="compact")
    assert compact.position_ids.tolist() == [[5, 6], [5, 6], [5, 6]]


# ---------------------------------------------------------------------------------- bad arguments
@pytest.mark.parametrize(
    "call, error, words",
    [
        (lambda: R.soft_topk(torch.randn(5), 0), ValueError, "k must satisfy 1 <= k <= N"),
        (lambda: R.soft_topk(torch.randn(5), 6), ValueError, "segment 0 has N = 5 and k = 6"),
        (lambda: R.soft_topk(torch.randn(5), 2.5), TypeError, "k must be an int"),
        (lambda: R.soft_topk(torch.randn(5), torch.tensor([1.0])), TypeError, "integer tensor"),
        (lambda: R.soft_topk(torch.randn(5), torch.tensor([1, 2]), torch.tensor([0, 5])), ValueError, "k must have shape (1,)"),
        (lambda: R.soft_topk(torch.tensor([1.0, float("nan")]), 1), ValueError, "scores must be finite"),
        (lambda: R.soft_topk(torch.tensor([1.0, float("inf")]), 1), ValueError, "scores must be finite"),
        (lambda: R.soft_topk(torch.randn(2, 3), 1), ValueError, "scores must have 1 dimension"),
        (lambda: R.soft_topk(torch.arange(4), 1), TypeError, "scores must have dtype"),
        (lambda: R.soft_topk(torch.randn(5), 1, torch.tensor([0, 2, 4])), ValueError, "cu_seqlens[-1] must equal the number of tokens (5), got 4"),
        (lambda: R.soft_topk(torch.randn(5), 1, torch.tensor([1, 5])), ValueError, "cu_seqlens[0] must be 0, got 1"),
        (lambda: R.soft_topk(torch.randn(5), 1, torch.tensor([0, 3, 3, 5])), ValueError, "strictly increasing"),
        (lambda: R.soft_topk(torch.randn(5), 1, torch.tensor([0.0, 5.0])), TypeError, "cu_seqlens must have dtype"),
        (lambda: R.soft_topk(torch.randn(5), 1, tau=0.0), ValueError, "tau must be a finite number > 0, got 0.0"),
        (lambda: R.soft_topk(torch.randn(5), 1, tau=-1.0), ValueError, "tau must be a finite number > 0"),
        (lambda: R.soft_topk(torch.randn(5), 1, f="softmax"), ValueError, "f must be one of"),
        (lambda: R.vp_gate(torch.randn(3, 4), torch.rand(4)), ValueError, "alpha must have shape x.shape[:-1]"),
        (lambda: R.vp_gate(torch.randn(3, 4), torch.tensor([0.5, 1.5, 0.1])), ValueError, "alpha must lie in [0, 1]"),
        (lambda: R.vp_gate(torch.randn(3, 4), torch.rand(3), torch.randn(3, 5)), ValueError, "noise must have the shape of x"),
        (lambda: R.select_tokens(torch.randn(4), torch.randn(3, 2), 1), ValueError, "features must have 4 rows"),
        (lambda: R.select_tokens(torch.randn(4), None, 1, position_mode="packed"), ValueError, "position_mode must be one of"),
        (lambda: R.select_tokens(torch.randn(4), None, 1, positions=torch.zeros(2, 4, dtype=torch.long)), ValueError, "positions must have shape (4,) or (3, 4)"),
    ],
)
def test_bad_arguments_get_clear_errors(call, error, words):
    with pytest.raises(error) as info:
        call()
    assert words in str(info.value)
