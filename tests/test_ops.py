"""Every torch custom op of autoselect_fast passes ``torch.library.opcheck`` on small CPU inputs.

The ops are reached as ``torch.ops.autoselect_fast.*`` (registered by importing ``autoselect_fast.ops``);
the set of registered ops must equal ``OPS``, so a new op cannot go without its check here. opcheck runs
all four of its test_utils (one is left out for ``select`` with features that require grad, see its
test): ``test_schema`` (the schema matches what the op mutates and
returns), ``test_autograd_registration`` (inputs that require grad reach a registered autograd
formula), ``test_faketensor`` (the fake implementation gives the real outputs' metadata) and
``test_aot_dispatch_dynamic`` (AOT autograd with dynamic shapes agrees with eager). The Triton ops run
in the interpreter (TRITON_INTERPRET=1, set by conftest) on 11 tokens; ``select`` also runs its
reference backend, which needs no kernels. Each case also checks the op's values against the float64
reference.
"""
import pytest
import torch

from autoselect_fast import ops
from autoselect_fast import reference as R

OPS = ("select", "soft_topk", "soft_topk_backward", "vp_gate", "vp_gate_backward")
K, CU, KEPT_CU = torch.tensor([2, 3]), torch.tensor([0, 5, 11]), torch.tensor([0, 2, 5])


def needs_interpreted_kernels():
    if ops.resolve_backend("auto", torch.device("cpu")) != "triton":
        pytest.skip("TRITON_INTERPRET is not 1: the Triton kernels cannot run on CPU tensors")


def op(name):
    return getattr(torch.ops.autoselect_fast, name).default


def inputs(seed=1):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(11, generator=gen)
    x = torch.randn(5, 8, generator=gen)
    alpha = torch.rand(5, generator=gen)
    return gen, scores, x, alpha


def test_every_registered_op_is_checked_here():
    names = torch._C._dispatch_get_all_op_names()
    assert {n.split("::", 1)[1] for n in names if n.startswith("autoselect_fast::")} == set(OPS)


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("positions_kind", ["none", "1d", "mrope"])
@pytest.mark.parametrize("compact", [False, True])
def test_select_op(backend, positions_kind, compact):
    """All four test_utils on plain inputs; with features that require grad, test_aot_dispatch_dynamic is
    left out: its helper sums every output into one accumulator whose dtype the first output sets (the
    int64 indices) and then fails adding the float rows, a limitation of the helper. The gather's
    gradient (ones on the kept rows) is checked by hand instead."""
    if backend == "triton":
        needs_interpreted_kernels()
    _, scores, _, _ = inputs()
    features = torch.randn(11, 4, generator=torch.Generator().manual_seed(2))
    positions = {"none": None, "1d": torch.arange(11) + 3, "mrope": torch.arange(33).view(3, 11)}[positions_kind]
    args = (scores, features, K, CU, KEPT_CU, positions, 5, compact, backend, None, None, None)
    torch.library.opcheck(op("select"), args)
    indices, kept, kept_positions = op("select")(*args)
    mode = "compact" if compact else "original"
    want = R.select_tokens(scores, features, K, CU, positions=positions, position_mode=mode)
    assert torch.equal(indices, want.indices) and torch.equal(kept, want.features)
    assert torch.equal(kept_positions, want.position_ids)

    leaf = features.clone().requires_grad_(True)
    grad_args = (scores, leaf, *args[2:])
    without_aot = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(op("select"), grad_args, test_utils=without_aot)
    (grad,) = torch.autograd.grad(op("select")(*grad_args)[1].sum(), leaf)
    expected = torch.zeros(11, 4)
    expected[want.indices] = 1.0
    assert torch.equal(grad, expected)


@pytest.mark.parametrize("f", ["laplace", "sigmoid"])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("block_n", [None, 4], ids=["on_chip", "looped"])
def test_soft_topk_ops(f, normalize, block_n):
    needs_interpreted_kernels()
    gen, scores, _, _ = inputs()
    scores.requires_grad_(True)
    args = (scores, K, CU, 0.5, f, normalize, block_n, None)
    torch.library.opcheck(op("soft_topk"), args)
    alpha, stats = op("soft_topk")(*args)
    assert stats.shape == (2, ops.SOFT_TOPK_STATS) and stats.dtype == torch.float32
    scores_ref = scores.detach().double().requires_grad_(True)
    alpha_ref = R.soft_topk(scores_ref, K, CU, tau=0.5, f=f, normalize=normalize)
    assert torch.allclose(alpha.detach().double(), alpha_ref, atol=2e-5)

    upstream = torch.randn(11, generator=gen)
    backward_args = (scores.detach(), upstream, K, CU, stats.detach(), 0.5, f, normalize, block_n, None)
    torch.library.opcheck(op("soft_topk_backward"), backward_args)
    (grad_ref,) = torch.autograd.grad(alpha_ref, scores_ref, upstream.double())
    grad = op("soft_topk_backward")(*backward_args)
    assert torch.allclose(grad.double(), grad_ref, atol=1e-4 * max(1.0, grad_ref.abs().max().item()))


@pytest.mark.parametrize("block_d", [None, 4])
def test_vp_gate_ops(block_d):
    needs_interpreted_kernels()
    gen, _, x, alpha = inputs()
    x.requires_grad_(True)
    alpha.requires_grad_(True)
    args = (x, alpha, 3, 7, 1e-6, block_d)
    torch.library.opcheck(op("vp_gate"), args)
    noise = ops.vp_gate_noise(x.shape, 3, 7, backend="reference").double()
    x_ref, alpha_ref = x.detach().double().requires_grad_(True), alpha.detach().double().requires_grad_(True)
    out_ref = R.vp_gate(x_ref, alpha_ref, noise=noise)
    assert torch.allclose(op("vp_gate")(*args).detach().double(), out_ref, atol=1e-5)

    grad_out = torch.randn(5, 8, generator=gen)
    backward_args = (x.detach(), alpha.detach(), grad_out, 3, 7, 1e-6, block_d)
    torch.library.opcheck(op("vp_gate_backward"), backward_args)
    grad_x, grad_alpha = op("vp_gate_backward")(*backward_args)
    want_x, want_alpha = torch.autograd.grad(out_ref, (x_ref, alpha_ref), grad_out.double())
    assert torch.allclose(grad_x.double(), want_x, atol=1e-5)
    assert torch.allclose(grad_alpha.double(), want_alpha, atol=1e-4)
