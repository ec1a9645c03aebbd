"""The hot path makes no device→host synchronisation, the ops trace as torch custom ops, and a GPU run
cannot silently fall back to a slow path.

How "no sync" is shown without a GPU: the function is traced by ``torch.compile(fullgraph=True)``
(one graph, no break) and the captured graph is searched for host reads. Dynamo (torch 2.13) puts a
data-dependent read into the graph instead of breaking it: ``.item()``/``.tolist()``/``int(t)`` become
``item`` calls with an unbacked symbol, ``nonzero`` and boolean masks an unbacked size. Every device→host
read of tensor data therefore shows up as such a node (``host_reads``); a test below checks that the
detector sees each of these patterns. (A read whose value is never used is dropped from the graph as
dead code and not seen; real code uses what it reads.) On CUDA the same stages also run under
``torch.cuda.set_sync_debug_mode("error")``, which also catches blocking host→device copies.
"""
import copy
import os
import subprocess
import sys

import pytest
import torch
from device_values import DeviceValueTracker
from torch._dynamo.backends.registry import lookup_backend
from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

from autoselect_fast import engine as engine_module
from autoselect_fast import ops, packing
from autoselect_fast import reference as R
from autoselect_fast.ops import selection
from autoselect_fast.ragged import cu_seqlens_from_lengths
from autoselect_fast.timing import Stopwatch
from autoselect_fast.validation import VALIDATE_ENV, resolve_validate

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")
HOST_READ_METHODS = ("item", "tolist", "cpu", "numpy", "nonzero")


# --------------------------------------------------------------------------------------------------
# The detector
# --------------------------------------------------------------------------------------------------
def trace(fn, *args, backend="eager"):
    """Run ``fn`` under torch.compile(fullgraph=True); returns (captured FX graphs, output)."""
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return lookup_backend(backend)(gm, example_inputs)

    torch._dynamo.reset()
    out = torch.compile(fn, fullgraph=True, backend=capture)(*args)
    return graphs, out


def host_reads(gm) -> list[str]:
    """Nodes of a Dynamo graph that read tensor data on the host (see the module docstring)."""
    found = []
    for node in gm.graph.nodes:
        if node.op == "call_method" and node.target in HOST_READ_METHODS:
            found.append(node.format_node())
        elif free_unbacked_symbols(node.meta.get("example_value")):
            found.append(node.format_node())
    return found


def custom_ops_in(gm) -> set[str]:
    return {str(node.target) for node in gm.graph.nodes if str(node.target).startswith("autoselect_fast.")}


@pytest.mark.parametrize(
    "name, fn",
    [
        ("item", lambda s, k: s.sum().item() + 1),
        ("tolist", lambda s, k: k.tolist()),
        ("int", lambda s, k: s[: int(k.sum())]),
        ("nonzero", lambda s, k: s.nonzero()),
        ("mask", lambda s, k: s[s > 0]),
        ("select_budget_tensor_without_total_k", lambda s, k: ops.select(s, None, k, torch.tensor([0, 5, 11])).indices),
    ],
)
def test_detector_sees_host_reads(name, fn):
    graphs, _ = trace(fn, torch.randn(11), torch.tensor([2, 3]))
    assert len(graphs) == 1 and host_reads(graphs[0]), name


# --------------------------------------------------------------------------------------------------
# The three ops under torch.compile(fullgraph=True)
# --------------------------------------------------------------------------------------------------
def _training_and_inference(scores, features, x, cu):
    sel = ops.select(scores, features, [2, 3], cu)
    alpha = ops.soft_topk(scores, [2, 3], cu, tau=0.5)
    gated = ops.vp_gate(x, alpha, seed=7, offset=5)
    return sel.indices, sel.features, sel.position_ids, sel.cu_seqlens, alpha, gated


def test_compiled_ops_make_one_graph_without_host_reads(kernel_device):
    """select + soft_topk + vp_gate: one graph, no host read, same values and gradients as eager."""
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(11, generator=gen).to(kernel_device).requires_grad_()
    features = torch.randn(11, 4, generator=gen).to(kernel_device).requires_grad_()
    x = torch.randn(11, 6, generator=gen).to(kernel_device).requires_grad_()
    cu = torch.tensor([0, 5, 11], device=kernel_device)

    graphs, got = trace(_training_and_inference, scores, features, x, cu, backend="aot_eager")
    assert len(graphs) == 1
    assert host_reads(graphs[0]) == []
    assert custom_ops_in(graphs[0]) == {"autoselect_fast.select.default", "autoselect_fast.soft_topk.default", "autoselect_fast.vp_gate.default"}
    want = _training_and_inference(scores, features, x, cu)
    for a, b in zip(got, want):
        assert torch.equal(a, b)

    def loss(out):
        return out[1].sum() * 0.5 + (out[4] ** 2).sum() + (out[5] * torch.linspace(-1, 1, 6, device=kernel_device)).sum()

    grads_compiled = torch.autograd.grad(loss(got), (scores, features, x))
    grads_eager = torch.autograd.grad(loss(want), (scores, features, x))
    for a, b in zip(grads_compiled, grads_eager):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_compiled_select_on_the_reference_backend():
    """The reference selection is a custom op too, so it traces on any CPU (interpreter or not)."""
    scores, features, cu = torch.randn(11), torch.randn(11, 3), torch.tensor([0, 5, 11])
    positions = torch.arange(3 * 11).view(3, 11)

    def fn(s, f, c, p):
        sel = ops.select(s, f, 2, c, positions=p, position_mode="compact", backend="reference")
        return sel.indices, sel.features, sel.position_ids

    graphs, got = trace(fn, scores, features, cu, positions)
    assert len(graphs) == 1 and host_reads(graphs[0]) == []
    want = R.select_tokens(scores, features, 2, cu, positions=positions, position_mode="compact")
    assert torch.equal(got[0], want.indices) and torch.equal(got[1], want.features) and torch.equal(got[2], want.position_ids)


def test_eager_inference_select_skips_the_dispatcher(monkeypatch, kernel_device):
    """Same result with and without the custom op; the op is used exactly when autograd needs it."""
    calls = []
    op = selection.select_op

    def counted(*args):
        calls.append(1)
        return op(*args)

    monkeypatch.setattr(selection, "select_op", counted)
    gen = torch.Generator().manual_seed(2)
    scores = torch.randn(40, generator=gen).to(kernel_device)
    features = torch.randn(40, 6, generator=gen).to(kernel_device)
    cu = torch.tensor([0, 15, 40], device=kernel_device)
    plain = ops.select(scores, features, [4, 9], cu)
    assert calls == []
    leaf = features.clone().requires_grad_()
    tracked = ops.select(scores, leaf, [4, 9], cu)
    assert calls == [1]
    assert torch.equal(plain.indices, tracked.indices) and torch.equal(plain.features, tracked.features.detach())
    (grad,) = torch.autograd.grad(tracked.features.sum(), leaf)  # the gather's gradient: ones on the kept rows
    want = torch.zeros(40, 6, device=kernel_device)
    want[plain.indices] = 1.0
    assert torch.equal(grad, want)


# --------------------------------------------------------------------------------------------------
# Validation: data checks are opt-in, metadata checks always run, sizes come from the host
# --------------------------------------------------------------------------------------------------
def test_resolve_validate(monkeypatch):
    monkeypatch.delenv(VALIDATE_ENV, raising=False)
    assert resolve_validate(None, torch.device("cpu")) is True  # host memory: the checks are free
    assert resolve_validate(None, torch.device("cuda")) is False  # each check would be a sync
    assert resolve_validate(True, torch.device("cuda")) is True and resolve_validate(False, torch.device("cpu")) is False
    monkeypatch.setenv(VALIDATE_ENV, "1")
    assert resolve_validate(None, torch.device("cuda")) is True
    monkeypatch.setenv(VALIDATE_ENV, "0")
    assert resolve_validate(None, torch.device("cpu")) is False
    monkeypatch.setenv(VALIDATE_ENV, "maybe")
    with pytest.raises(ValueError, match="AUTOSELECT_FAST_VALIDATE must be"):
        resolve_validate(None, torch.device("cpu"))
    with pytest.raises(TypeError, match="validate must be a bool"):
        resolve_validate(1, torch.device("cpu"))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter computes on the unchecked NaN / α > 1
def test_data_checks_run_only_when_validating(kernel_device):
    scores = torch.randn(10, device=kernel_device)
    scores[3] = float("nan")
    cu = torch.tensor([0, 6, 10], device=kernel_device)
    with pytest.raises(ValueError, match="scores must be finite"):
        ops.select(scores, None, 2, cu, validate=True)
    ops.select(scores, None, 2, cu, validate=False)  # not read: no error, no sync
    with pytest.raises(ValueError, match="scores must be finite"):
        ops.soft_topk(scores, 2, cu, validate=True)
    ops.soft_topk(scores, 2, cu, validate=False)
    x, alpha = torch.randn(4, 8, device=kernel_device), torch.full((4,), 1.5, device=kernel_device)
    with pytest.raises(ValueError, match=r"alpha must lie in \[0, 1\]"):
        ops.vp_gate(x, alpha, seed=0, validate=True)
    ops.vp_gate(x, alpha, seed=0, validate=False)
    # Metadata checks hold whatever validate says.
    with pytest.raises(TypeError, match="scores must have dtype"):
        ops.select(scores.long(), None, 2, cu, validate=False)
    with pytest.raises(ValueError, match="k must satisfy"):
        ops.select(scores, None, 0, cu, validate=False)
    with pytest.raises(ValueError, match="k must have shape"):
        ops.soft_topk(scores, [2, 2, 2], cu, validate=False)
    with pytest.raises(ValueError, match="seed must satisfy"):
        ops.vp_gate(x, alpha, seed=-1, validate=False)


def test_host_budgets_and_total_k(kernel_device):
    gen = torch.Generator().manual_seed(3)
    scores = torch.randn(30, generator=gen).to(kernel_device)
    features = torch.randn(30, 5, generator=gen).to(kernel_device)
    cu = torch.tensor([0, 12, 30], device=kernel_device)
    k_tensor = torch.tensor([3, 7], device=kernel_device)
    want = R.select_tokens(scores.cpu(), features.cpu(), torch.tensor([3, 7]), cu.cpu())
    for got in (
        ops.select(scores, features, [3, 7], cu),
        ops.select(scores, features, (3, 7), cu, validate=False),
        ops.select(scores, features, k_tensor, cu, total_k=10, validate=False),
        ops.select(scores, features, k_tensor, cu),
    ):
        assert torch.equal(got.indices.cpu(), want.indices) and torch.equal(got.features.cpu(), want.features)
        assert torch.equal(got.cu_seqlens.cpu(), want.cu_seqlens)
    scalar = ops.select(scores, features, torch.tensor(5, device=kernel_device), cu)  # a 0-d budget for every image
    assert torch.equal(scalar.indices.cpu(), R.select_tokens(scores.cpu(), features.cpu(), 5, cu.cpu()).indices)
    alpha_list = ops.soft_topk(scores, [3, 7], cu, tau=0.3)
    torch.testing.assert_close(alpha_list, ops.soft_topk(scores, k_tensor, cu, tau=0.3))
    with pytest.raises(ValueError, match=r"total_k must equal the sum of k \(10\), got 9"):
        ops.select(scores, features, [3, 7], cu, total_k=9)
    with pytest.raises(ValueError, match=r"total_k must equal the sum of k \(10\), got 11"):
        ops.select(scores, features, k_tensor, cu, total_k=11, validate=True)
    with pytest.raises(ValueError, match="total_k must be an int >= 0"):
        ops.select(scores, features, k_tensor, cu, total_k=-1)
    with pytest.raises(TypeError, match="k must be an int, a list of ints"):
        ops.select(scores, features, [3, 7.0], cu)
    with pytest.raises(ValueError, match="segment 0 has N = 30 and k = 31"):
        ops.select(scores, features, [31])  # one image: N is known on the host, checked without validate
    with pytest.raises(ValueError, match="segment 1 has k = 0"):
        ops.soft_topk(scores, [3, 0], cu, validate=False)


def test_a_cuda_generator_is_refused_for_the_seed():
    class FakeCudaGenerator:
        device = torch.device("cuda")

    with pytest.raises(ValueError, match="generator must be a CPU torch.Generator"):
        ops.draw_seed(FakeCudaGenerator())


# --------------------------------------------------------------------------------------------------
# The engine: prune without host reads; recorded backends; no silent fallback
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_llava():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from autoselect_fast.modules import Scorer, ScorerConfig

    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=28, patch_size=7)
    text = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    torch.manual_seed(0)
    config = LlavaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_id=127, image_seq_length=16)
    model = LlavaForConditionalGeneration(config).eval()
    scorer = Scorer(ScorerConfig(input_dim=32, hidden_dim=32, num_layers=1, num_heads=4)).eval()
    return model, scorer


def _prune_inputs(device, n_images=2):
    gen = torch.Generator().manual_seed(4)
    features = [torch.randn(16, 32, generator=gen).to(device) for _ in range(n_images)]
    positions = torch.cat([torch.arange(16) + 3 + 40 * i for i in range(n_images)])
    return features, positions


@pytest.mark.parametrize(
    "keep, selection_backend", [(5, "auto"), (5, "reference"), (16, "auto")], ids=["pruned", "pruned_reference", "keep_all"]
)
def test_engine_prune_has_no_host_reads(tiny_llava, keep, selection_backend):
    model, scorer = tiny_llava
    engine = engine_module.AutoSelectEngine(model, scorer, keep=keep, selection_backend=selection_backend, score_cache_size=0)
    features, positions = _prune_inputs(engine.device)
    budgets = [keep] * len(features)
    want = engine.prune(features, budgets, positions=positions)

    def prune(feats, pos):
        return engine.prune(feats, budgets, positions=pos)

    graphs, got = trace(prune, features, positions)
    assert len(graphs) == 1
    assert host_reads(graphs[0]) == []
    if keep < 16:
        assert custom_ops_in(graphs[0]) == {"autoselect_fast.select.default"}
    for name in ("indices", "features", "position_ids", "cu_seqlens"):
        assert torch.equal(getattr(got.selection, name), getattr(want.selection, name)), name


@pytest.mark.xfail(strict=True, reason="modules.Scorer reads cu_seqlens on the host (check + padding + boolean mask) for images of different sizes")
def test_engine_prune_of_images_of_different_sizes_has_no_host_reads(tiny_llava):
    model, scorer = tiny_llava
    engine = engine_module.AutoSelectEngine(model, scorer, keep=5, score_cache_size=0)
    gen = torch.Generator().manual_seed(5)
    features = [torch.randn(16, 32, generator=gen), torch.randn(24, 32, generator=gen)]
    positions = torch.cat([torch.arange(16), torch.arange(24) + 50])

    graphs, _ = trace(lambda feats, pos: engine.prune(feats, [5, 5], positions=pos), features, positions)
    assert len(graphs) == 1 and host_reads(graphs[0]) == []


def test_engine_records_its_backends(tiny_llava):
    model, scorer = tiny_llava
    engine = engine_module.AutoSelectEngine(model, scorer, keep=4)
    interpreted = ops.resolve_backend("auto", engine.device) == "triton"
    assert engine.selection_backend == ("ops" if interpreted else "reference")
    assert engine.packer_backend == ("extension" if packing.extension_available() else "reference")
    assert engine_module.AutoSelectEngine(model, scorer, keep=4, selection_backend="reference").selection_backend == "reference"


def test_selection_backend_failure_raises_instead_of_falling_back(monkeypatch):
    if ops.resolve_backend("auto", torch.device("cpu")) != "triton":
        pytest.skip("needs the kernels on CPU (TRITON_INTERPRET=1)")

    def broken(*args, **kwargs):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(ops, "select", broken)
    for name in ("auto", "ops"):
        with pytest.raises(RuntimeError, match=rf"selection_backend='{name}' is not usable on cpu: kernel exploded"):
            engine_module.resolve_selection_backend(name, torch.device("cpu"))


def test_interpreted_kernels_are_refused_for_cuda_tensors():
    """In this CPU process the kernels are interpreted: CUDA tensors must get an error, not the interpreter."""
    if not ops.kernels_interpreted():
        pytest.skip("the kernels are compiled in this process")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        ops.resolve_backend("auto", torch.device("cuda"))
    with pytest.raises(RuntimeError, match="selection_backend='auto' is not usable on cuda"):
        engine_module.resolve_selection_backend("auto", torch.device("cuda"))


def test_packer_on_cuda_never_falls_back_to_the_reference(monkeypatch):
    monkeypatch.setattr(packing, "_C", None)
    monkeypatch.setattr(packing, "_C_IMPORT_ERROR", ImportError("simulated: no extension"))
    with pytest.raises(RuntimeError, match="the C\\+\\+ packer cannot run on cuda: .*simulated"):
        engine_module.resolve_packer(torch.device("cuda"))
    assert engine_module.resolve_packer(torch.device("cpu"))[0] == "reference"


# --------------------------------------------------------------------------------------------------
# The whole prefill / generate on a CPU model: no host read of a device value, no sync without timings
# --------------------------------------------------------------------------------------------------
# The CPU attention backend (a loop of SDPA calls over the segments) reads the segment bounds on the
# host by design; on a GPU the engine takes flash-attn or torch's varlen kernel, which read nothing.
CPU_ONLY_READS = ("autoselect_fast/attention.py", "_sdpa_segments")


def tracked_engine(monkeypatch, model, scorer, **kwargs):
    """An engine, and a tracker whose device values include the packer's outputs (the C++ extension
    is called outside the dispatcher; on a GPU its outputs live on the device)."""
    tracker = DeviceValueTracker(model, scorer)
    pack = packing.pack_varlen

    def tracked_pack(*args):
        out = pack(*args)
        for name in ("embeds", "cu_seqlens", "position_ids", "last_token_index"):
            value = getattr(out, name).clone()
            tracker.mark(value)
            setattr(out, name, value)
        return out

    monkeypatch.setattr(packing, "pack_varlen", tracked_pack)  # before the engine picks its packer
    return engine_module.AutoSelectEngine(model, scorer, score_cache_size=0, **kwargs), tracker


def _made_in(read, path: str, function: str) -> bool:
    return any(path in frame and f"({function})" in frame for frame in read.where)


def engine_reads(tracker) -> list:
    return [r for r in tracker.reads if not _made_in(r, *CPU_ONLY_READS)]


def llava_requests():
    gen = torch.Generator().manual_seed(8)
    pixels = [torch.randn(3, 28, 28, generator=gen) for _ in range(3)]
    return [
        engine_module.Request([1, 5, 6, 127, 7, 8], pixel_values=pixels[0]),
        engine_module.Request([1, 9, 10, 2]),  # text only
        engine_module.Request([1, 3, 127, 4, 127, 2], images=[pixels[1], pixels[2]]),
    ]


@pytest.mark.parametrize("keep, mode", [(5, "original"), (5, "compact"), (None, "original")], ids=["pruned", "compact", "keep_all"])
def test_prefill_reads_no_device_value_without_timings(monkeypatch, tiny_llava, keep, mode):
    model, scorer = tiny_llava
    engine, tracker = tracked_engine(monkeypatch, model, scorer, keep=keep, position_mode=mode)
    requests = llava_requests()
    want = engine.prefill(requests)  # untracked: warm-up and the values to compare with
    with tracker:
        got = engine.prefill(requests)
    assert [str(r) for r in engine_reads(tracker)] == []
    assert tracker.syncs == [] and got.timings_ms == {}
    torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=0)
    assert got.kept_tokens == want.kept_tokens and got.sequence_lengths == want.sequence_lengths

    with tracker:  # asked for timings: a synchronisation around every stage (a no-op on the CPU)
        timed = engine.prefill(requests, timings=True)
    assert [s.what for s in tracker.syncs] == ["Stopwatch sync"] * 8  # before and after each of the 4 stages
    assert set(timed.timings_ms) == {"vision", "prune", "pack", "prefill", "total"}


def test_qwen_prefill_reads_no_device_value_without_timings(monkeypatch):
    """Qwen2.5-VL (M-RoPE positions, the adapter's pre-merger tower): an image and a text-only request."""
    from test_engine_qwen import image_input, image_processor, image_prompt, picture, tiny_qwen

    from autoselect_fast.modules import Scorer, ScorerConfig

    model = tiny_qwen(seed=5)
    torch.manual_seed(3)
    scorer = Scorer(ScorerConfig(input_dim=4 * 32, hidden_dim=32, num_layers=1, num_heads=4)).eval()
    engine, tracker = tracked_engine(monkeypatch, model, scorer, keep_ratio=0.3, image_processor=image_processor())
    processed = image_processor()(images=[picture(0, (220, 100))], return_tensors="pt")
    wide = {"wide": (processed["pixel_values"], processed["image_grid_thw"][0])}
    requests = [engine_module.Request(image_prompt(9, 10), images=[image_input(wide, "wide")]), engine_module.Request([240, 2, 16, 17])]
    want = engine.prefill(requests)
    with tracker:
        got = engine.prefill(requests)
    assert [str(r) for r in engine_reads(tracker)] == [] and tracker.syncs == []
    torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=0)
    assert got.kept_tokens == want.kept_tokens and got.kept_tokens[0] < got.visual_tokens[0]


@pytest.mark.parametrize("padded", [False, True], ids=["eager_prefill", "padded_prefill"])
@pytest.mark.parametrize("read_every, flag_reads", [(8, 0), (2, 2)])
def test_generate_reads_only_the_finished_flags_and_its_tokens(monkeypatch, tiny_llava, read_every, flag_reads, padded):
    """Besides the prefill (no read), decoding reads the "every request finished" flag every
    ``read_every`` steps (5 tokens: after tokens 2 and 4 with read_every=2, never with 8) and the new
    tokens once, at the end; nothing else (the decode step's 4-D mask is not checked by transformers),
    and no sync without timings. ``padded``: the runner pads every stage (``RunnerConfig(pad_to_buckets=True)``,
    what a CUDA graph replays), so the prefill also captures its K/V into the runner's static buffers and
    scatters them into the decode cache: no read there either."""
    model, scorer = tiny_llava
    config = engine_module.RunnerConfig(pad_to_buckets=True) if padded else None
    engine, tracker = tracked_engine(monkeypatch, model, scorer, keep=5, runner_config=config)
    requests = llava_requests()
    want = engine.generate(requests, max_new_tokens=5)  # untracked: creates the static buffers, the K/V capture included
    for tensor in engine.runner.static_tensors():  # on a GPU they live on the device
        tracker.mark(tensor)
    with tracker:
        got = engine.generate(requests, max_new_tokens=5, read_every=read_every)
    assert got.token_ids == want.token_ids and got.prefill.timings_ms == {}
    assert tracker.syncs == []
    reads = engine_reads(tracker)
    assert all(_made_in(r, "autoselect_fast/engine/decode.py", "decode") for r in reads), [str(r) for r in reads]
    assert [r.what for r in reads] == ["Tensor.__bool__"] * flag_reads + ["Tensor.tolist"]
    prefill = engine.runner.stats_dict()["prefill"]
    assert (prefill["padded"], prefill["eager"]) == ((2, {}) if padded else (0, {"not_cuda": 2})), prefill
    assert (engine.runner.prefill_kv_bytes() > 0) == padded


def _one_stage(clock):
    with clock.stage("x"):  # a sync on entering and one on leaving
        pass


@pytest.mark.parametrize(
    "name, fn",
    [
        ("item", lambda x, i: (x.sum().item(),)),
        ("tolist", lambda x, i: (x.tolist(),)),
        ("bool", lambda x, i: (bool(x.sum() > 0),)),
        ("cpu", lambda x, i: (x.cpu(),)),
        ("nonzero", lambda x, i: (x.nonzero(),)),
        ("mask", lambda x, i: (x[x > 0],)),
        ("host_indexed_by_device", lambda x, i: (torch.arange(10)[i.to("cpu")],)),
        ("repeat_interleave", lambda x, i: (torch.repeat_interleave(i.to("cpu")),)),
        ("stopwatch", lambda x, i: _one_stage(Stopwatch("cpu"))),
        ("cuda_synchronize", lambda x, i: torch.cuda.synchronize()),
    ],
)
def test_device_value_tracker_sees_each_read(name, fn):
    """The detector behind the two tests above catches every kind of read it claims to."""
    weight = torch.nn.Linear(4, 1)
    tracker = DeviceValueTracker(weight)
    host = torch.arange(4.0).view(1, 4)
    with tracker:
        x = weight(host).flatten()  # a device value
        indices = torch.tensor([1, 2]).to("cpu")  # moved "to the device"
        fn(x, indices)
        host.sum().item()  # host values are read freely
    assert len(tracker.reads) + len(tracker.syncs) == (2 if name == "stopwatch" else 1), (tracker.reads, tracker.syncs)


# --------------------------------------------------------------------------------------------------
# CUDA: compiled kernels, no sync under set_sync_debug_mode("error"), CUDA-graph capture
# --------------------------------------------------------------------------------------------------
@requires_cuda
def test_cuda_runs_compiled_kernels_and_the_engine_picks_them(tiny_llava):
    assert ops.kernels_compiled() and not ops.kernels_interpreted()
    assert ops.resolve_backend("auto", torch.device("cuda")) == "triton"
    model, scorer = tiny_llava
    engine = engine_module.AutoSelectEngine(copy.deepcopy(model).cuda(), copy.deepcopy(scorer), keep=4)
    assert (engine.selection_backend, engine.packer_backend) == ("ops", "extension")


@requires_cuda
def test_cuda_ops_make_no_sync():
    device = torch.device("cuda")
    scores = torch.randn(300, device=device, requires_grad=True)
    features = torch.randn(300, 64, device=device, dtype=torch.float16)
    x = torch.randn(300, 64, device=device, requires_grad=True)
    cu = torch.tensor([0, 100, 300], device=device)

    def step():
        sel = ops.select(scores.detach(), features, [16, 64], cu, validate=False)
        alpha = ops.soft_topk(scores, [16, 64], cu, validate=False)
        out = ops.vp_gate(x, alpha, seed=11, offset=0, validate=False)
        out.sum().backward()
        return sel

    step()  # compiles the kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        sel = step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    want = R.select_tokens(scores.detach().cpu(), features.cpu(), torch.tensor([16, 64]), cu.cpu())
    assert torch.equal(sel.indices.cpu(), want.indices)


@requires_cuda
def test_cuda_engine_prune_makes_no_sync(tiny_llava):
    model, scorer = tiny_llava
    engine = engine_module.AutoSelectEngine(copy.deepcopy(model).cuda(), copy.deepcopy(scorer), keep=5, score_cache_size=0)
    features, positions = _prune_inputs(engine.device)
    want = engine.prune(features, [5, 5], positions=positions)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = engine.prune(features, [5, 5], positions=positions)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(got.selection.indices, want.selection.indices)


@requires_cuda
def test_cuda_graph_capture_of_select():
    device = torch.device("cuda")
    scores = torch.randn(600, device=device)
    features = torch.randn(600, 128, device=device, dtype=torch.float16)
    cu = torch.tensor([0, 576, 600], device=device)
    k = torch.tensor([64, 8], device=device)

    def run():
        return ops.select(scores, features, k, cu, total_k=72, validate=False)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run()  # warm-up: Triton compiles outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = run()
    scores.copy_(torch.randn(600, device=device))
    graph.replay()
    torch.cuda.synchronize()
    want = R.select_tokens(scores.cpu(), features.cpu(), k.cpu(), cu.cpu())
    assert torch.equal(captured.indices.cpu(), want.indices) and torch.equal(captured.features.cpu(), want.features)


@requires_cuda
def test_pytest_refuses_the_interpreter_on_a_gpu_machine():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    tests = os.path.dirname(__file__)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", os.path.join(tests, "test_kernels_selection.py")],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode != 0
    assert "TRITON_INTERPRET=1 is set on a machine with a GPU" in proc.stdout + proc.stderr


# --------------------------------------------------------------------------------------------------
# max_seqlen: the longest image from the host sizes the kernels' blocks
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_max_seqlen_from_the_host_gives_the_same_selection_and_mask(backend):
    if backend == "triton" and ops.resolve_backend("auto", torch.device("cpu")) != "triton":
        pytest.skip("the Triton interpreter is not enabled")
    gen = torch.Generator().manual_seed(11)
    lengths = [7, 19, 3]
    scores = torch.randn(sum(lengths), generator=gen)
    feats = torch.randn(sum(lengths), 5, generator=gen)
    cu = cu_seqlens_from_lengths(lengths)
    budgets = [2, 5, 3]
    plain = ops.select(scores, feats, budgets, cu, backend=backend)
    sized = ops.select(scores, feats, budgets, cu, max_seqlen=max(lengths), backend=backend)
    for name in ("indices", "features", "position_ids", "cu_seqlens"):
        assert torch.equal(getattr(plain, name), getattr(sized, name)), name
    alpha = ops.soft_topk(scores, budgets, cu, tau=0.5, backend=backend)
    alpha_sized = ops.soft_topk(scores, budgets, cu, tau=0.5, max_seqlen=max(lengths), backend=backend)
    torch.testing.assert_close(alpha_sized, alpha, rtol=1e-6, atol=1e-6)


def test_max_seqlen_errors():
    scores = torch.randn(26)
    cu = cu_seqlens_from_lengths([7, 19])
    with pytest.raises(ValueError, match="max_seqlen must be at least the longest image's token count \\(19\\), got 10"):
        ops.select(scores, None, [2, 2], cu, max_seqlen=10, validate=True)
    with pytest.raises(ValueError, match="max_seqlen must be an int >= 1"):
        ops.soft_topk(scores, [2, 2], cu, max_seqlen=0, validate=True)
