"""Tests of varlen packing: the reference's semantics on hand-written cases, the extension
(autoselect_fast._C through pack_varlen) against the reference on CPU (and on CUDA when a GPU is
present), and every argument error. Packing is a copy, so results must be exactly equal."""
from __future__ import annotations

import random

import pytest
import torch

from autoselect_fast import packing
from autoselect_fast.packing import PackedBatch, pack_varlen, pack_varlen_reference

# Skipped only where the extension may legitimately be missing; on a CUDA build with a GPU a missing
# extension makes these tests fail (pack_varlen raises ImportError with the build command).
requires_extension = pytest.mark.skipif(
    not packing.extension_available() and not packing.cuda_extension_expected(),
    reason="autoselect_fast._C is not built: run `pip install --no-build-isolation -e .`",
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


# --------------------------------------------------------------------------------------------------
# Batch construction
# --------------------------------------------------------------------------------------------------


def make_batch(requests, *, hidden=8, dtype=torch.float32, mrope=False, device="cpu", seed=0):
    """Build pack_varlen's arguments.

    ``requests`` is a list of ``(text_len, [(insert_at, kept), ...])``: each request's text length
    and its images (insert point, number of kept tokens), in order. Embeddings are random, positions
    distinct per token so any misplaced copy shows.
    """
    gen = torch.Generator().manual_seed(seed)
    text_lens = [t for t, _ in requests]
    images = [(r, at, k) for r, (_, imgs) in enumerate(requests) for at, k in imgs]
    lt, kt = sum(text_lens), sum(k for _, _, k in images)

    def cum(xs):
        out = [0]
        for x in xs:
            out.append(out[-1] + x)
        return torch.tensor(out, dtype=torch.int64)

    def positions(n, offset):
        base = torch.arange(n, dtype=torch.int64) * 7 + offset
        return torch.stack([base, base + 1, base + 2]) if mrope else base

    args = dict(
        text_embeds=torch.randn(lt, hidden, generator=gen).to(dtype),
        text_cu_seqlens=cum(text_lens),
        text_positions=positions(lt, 0),
        visual_embeds=torch.randn(kt, hidden, generator=gen).to(dtype),
        visual_cu_seqlens=cum(k for _, _, k in images),
        visual_positions=positions(kt, 1_000_000),
        image_request=torch.tensor([r for r, _, _ in images], dtype=torch.int64),
        image_insert_at=torch.tensor([at for _, at, _ in images], dtype=torch.int64),
    )
    return {name: t.to(device) for name, t in args.items()}


def random_requests(num_requests, *, seed, text=(0, 12), images=(0, 3), kept=(1, 9)):
    rng = random.Random(seed)
    requests = []
    for _ in range(num_requests):
        text_len = rng.randint(*text)
        n_images = rng.randint(*images)
        if text_len == 0:
            n_images = max(n_images, 1)  # a request needs at least one token
        inserts = sorted(rng.randint(0, text_len) for _ in range(n_images))
        images_ = [(at, rng.randint(*kept)) for at in inserts]
        if text_len == 0 and images_[0][1] == 0:
            images_[0] = (0, 1)
        requests.append((text_len, images_))
    return requests


CASES = {
    "one_request": [(5, [(2, 3)])],
    "b16_mixed": random_requests(16, seed=1),
    "no_image_at_all": [(4, []), (3, []), (1, [])],
    "some_requests_without_image": [(4, []), (3, [(1, 2)]), (2, []), (5, [(5, 1)])],
    "several_images_one_request": [(6, [(0, 2), (3, 4), (3, 1), (6, 2)])],
    "k_equals_n_all_kept": [(3, [(1, 24)]), (2, [(0, 24), (2, 24)])],
    "empty_text_around_image": [(0, [(0, 3)]), (2, [(0, 2)]), (2, [(2, 2)]), (0, [(0, 1), (0, 2)])],
    "image_with_zero_kept_tokens": [(3, [(1, 0), (2, 2)]), (1, [(0, 0)])],
}


def assert_same(got: PackedBatch, want: PackedBatch):
    assert got.embeds.dtype == want.embeds.dtype and got.embeds.device == want.embeds.device
    assert torch.equal(got.embeds, want.embeds)
    assert got.cu_seqlens.dtype == torch.int32 and torch.equal(got.cu_seqlens, want.cu_seqlens)
    assert isinstance(got.max_seqlen, int) and got.max_seqlen == want.max_seqlen
    assert got.position_ids.dtype == torch.int64 and torch.equal(got.position_ids, want.position_ids)
    assert got.last_token_index.dtype == torch.int64
    assert torch.equal(got.last_token_index, want.last_token_index)


# --------------------------------------------------------------------------------------------------
# The reference's semantics, on explicit expected tensors
# --------------------------------------------------------------------------------------------------


def test_reference_hand_written_1d():
    # Request 0: text t0 t1 t2, image a (2 tokens) after 1 text token. Request 1: text u0 u1, no image.
    text = torch.tensor([[1.0], [2.0], [3.0], [10.0], [11.0]])
    visual = torch.tensor([[-1.0], [-2.0]])
    out = pack_varlen_reference(
        text, torch.tensor([0, 3, 5]), torch.tensor([0, 3, 4, 0, 1]),
        visual, torch.tensor([0, 2]), torch.tensor([1, 2]),
        torch.tensor([0]), torch.tensor([1]),
    )
    assert torch.equal(out.embeds, torch.tensor([[1.0], [-1.0], [-2.0], [2.0], [3.0], [10.0], [11.0]]))
    assert torch.equal(out.cu_seqlens, torch.tensor([0, 5, 7], dtype=torch.int32))
    assert out.max_seqlen == 5
    assert torch.equal(out.position_ids, torch.tensor([0, 1, 2, 3, 4, 0, 1]))
    assert torch.equal(out.last_token_index, torch.tensor([4, 6]))


def test_reference_hand_written_mrope_shared_insert_point():
    # One request: text t0 t1; images a (1 token) and b (2 tokens) both after t0, then text t1;
    # image c (1 token) after all text. Images sharing an insert point go in image order.
    text = torch.tensor([[1.0, 1.5], [2.0, 2.5]])
    visual = torch.tensor([[-1.0, 0.0], [-2.0, 0.0], [-3.0, 0.0], [-4.0, 0.0]])
    text_pos = torch.tensor([[0, 9], [0, 9], [0, 9]])
    vis_pos = torch.tensor([[1, 2, 2, 8], [1, 2, 3, 8], [1, 3, 2, 8]])
    out = pack_varlen_reference(
        text, torch.tensor([0, 2]), text_pos,
        visual, torch.tensor([0, 1, 3, 4]), vis_pos,
        torch.tensor([0, 0, 0]), torch.tensor([1, 1, 2]),
    )
    expected = torch.tensor([[1.0, 1.5], [-1.0, 0.0], [-2.0, 0.0], [-3.0, 0.0], [2.0, 2.5], [-4.0, 0.0]])
    assert torch.equal(out.embeds, expected)
    assert torch.equal(out.cu_seqlens, torch.tensor([0, 6], dtype=torch.int32))
    assert out.max_seqlen == 6
    assert torch.equal(
        out.position_ids, torch.tensor([[0, 1, 2, 2, 9, 8], [0, 1, 2, 3, 9, 8], [0, 1, 3, 2, 9, 8]])
    )
    assert torch.equal(out.last_token_index, torch.tensor([5]))


def test_reference_all_tokens_kept_gives_full_sequence():
    # Everything kept, original positions: the packed positions are just 0..L-1 per request.
    text = torch.zeros(5, 1)
    visual = torch.ones(4, 1)
    out = pack_varlen_reference(
        text, torch.tensor([0, 2, 5]), torch.tensor([0, 2, 0, 1, 2]),
        visual, torch.tensor([0, 1, 4]), torch.tensor([1, 3, 4, 5]),
        torch.tensor([0, 1]), torch.tensor([1, 3]),
    )
    assert torch.equal(out.position_ids, torch.tensor([0, 1, 2, 0, 1, 2, 3, 4, 5]))
    assert torch.equal(out.embeds.squeeze(1), torch.tensor([0.0, 1, 0, 0, 0, 0, 1, 1, 1]))
    assert torch.equal(out.cu_seqlens, torch.tensor([0, 3, 9], dtype=torch.int32))


# --------------------------------------------------------------------------------------------------
# Extension vs reference (CPU)
# --------------------------------------------------------------------------------------------------


@requires_extension
@pytest.mark.parametrize("mrope", [False, True], ids=["pos1d", "pos3d"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_extension_matches_reference(case, dtype, mrope):
    args = make_batch(CASES[case], dtype=dtype, mrope=mrope)
    assert_same(pack_varlen(**args), pack_varlen_reference(**args))


@requires_extension
@pytest.mark.parametrize("threads", [2, 7])
@pytest.mark.parametrize("num_requests", [1, 16])
def test_extension_large_rows_multithreaded(num_requests, threads):
    # 8 KiB rows: the CPU path splits the output rows across threads, also inside segments and at
    # empty segments; 7 threads put the split points elsewhere than 2 do.
    requests = random_requests(num_requests, seed=num_requests, text=(0, 60), images=(0, 3), kept=(0, 150))
    args = make_batch(requests, hidden=2048, dtype=torch.float32, mrope=True)
    want = pack_varlen_reference(**args)
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = pack_varlen(**args)
    finally:
        torch.set_num_threads(saved)
    assert_same(got, want)


@requires_extension
def test_int32_index_tensors_and_odd_row_size():
    args = make_batch(CASES["b16_mixed"], hidden=3, dtype=torch.float16)
    for name in ("text_cu_seqlens", "visual_cu_seqlens", "image_request", "image_insert_at"):
        args[name] = args[name].to(torch.int32)
    assert_same(pack_varlen(**args), pack_varlen_reference(**args))


@requires_extension
def test_non_contiguous_inputs():
    args = make_batch(CASES["several_images_one_request"], hidden=8, mrope=True)
    args["text_embeds"] = torch.cat([args["text_embeds"], args["text_embeds"]], dim=1)[:, ::2]
    # (3, L) positions as a view of an (L, 3) tensor, as from a transposed M-RoPE layout.
    args["visual_positions"] = args["visual_positions"].t().contiguous().t()
    assert not args["text_embeds"].is_contiguous() and not args["visual_positions"].is_contiguous()
    assert_same(pack_varlen(**args), pack_varlen_reference(**args))


@requires_extension
def test_outputs_do_not_alias_inputs():
    args = make_batch(CASES["one_request"])
    out = pack_varlen(**args)
    before = out.embeds.clone()
    args["text_embeds"].zero_()
    args["visual_embeds"].zero_()
    assert torch.equal(out.embeds, before)


def test_missing_extension_raises_import_error(monkeypatch):
    monkeypatch.setattr(packing, "_C", None)
    monkeypatch.setattr(packing, "_C_IMPORT_ERROR", ImportError("No module named 'autoselect_fast._C'"))
    with pytest.raises(ImportError, match=r"pip install --no-build-isolation -e \."):
        pack_varlen(**make_batch(CASES["one_request"]))


# --------------------------------------------------------------------------------------------------
# Argument errors: each names the argument
# --------------------------------------------------------------------------------------------------


def _set(name, value):
    def mutate(args):
        args[name] = value(args) if callable(value) else value

    return mutate


ERRORS = {
    # name: (mutation of the two-request batch below, exception, text the message must contain)
    "not_a_tensor": (_set("image_request", [0, 1]), TypeError, "image_request"),
    "text_embeds_rank": (_set("text_embeds", lambda a: a["text_embeds"].flatten()), ValueError, "text_embeds"),
    "visual_embeds_rank": (_set("visual_embeds", lambda a: a["visual_embeds"][None]), ValueError, "visual_embeds"),
    "dtype_mismatch": (_set("visual_embeds", lambda a: a["visual_embeds"].half()), TypeError, "visual_embeds"),
    "hidden_mismatch": (_set("visual_embeds", lambda a: a["visual_embeds"][:, :4]), ValueError, "visual_embeds"),
    "device_mismatch": (_set("visual_embeds", lambda a: a["visual_embeds"].to("meta")), ValueError, "visual_embeds"),
    "positions_dtype": (_set("text_positions", lambda a: a["text_positions"].int()), TypeError, "text_positions"),
    "positions_rank_mismatch": (
        _set("visual_positions", lambda a: a["visual_positions"].expand(3, -1)), ValueError, "visual_positions"),
    "positions_length": (_set("text_positions", lambda a: a["text_positions"][:-1]), ValueError, "text_positions"),
    "positions_planes": (
        _set("text_positions", lambda a: a["text_positions"].expand(2, -1)), ValueError, "text_positions"),
    "positions_device": (
        _set("visual_positions", lambda a: a["visual_positions"].to("meta")), ValueError, "visual_positions"),
    "cu_float": (_set("text_cu_seqlens", lambda a: a["text_cu_seqlens"].float()), TypeError, "text_cu_seqlens"),
    "cu_rank": (_set("visual_cu_seqlens", lambda a: a["visual_cu_seqlens"][None]), ValueError, "visual_cu_seqlens"),
    "text_cu_too_short": (_set("text_cu_seqlens", torch.tensor([0])), ValueError, "text_cu_seqlens"),
    "text_cu_start": (_set("text_cu_seqlens", torch.tensor([1, 3, 5])), ValueError, "text_cu_seqlens[0]"),
    "text_cu_total": (_set("text_cu_seqlens", torch.tensor([0, 3, 4])), ValueError, "text_cu_seqlens[-1]"),
    "text_cu_decreasing": (_set("text_cu_seqlens", torch.tensor([0, 6, 5])), ValueError, "text_cu_seqlens"),
    "visual_cu_total": (_set("visual_cu_seqlens", torch.tensor([0, 2, 3])), ValueError, "visual_cu_seqlens[-1]"),
    "visual_cu_decreasing": (_set("visual_cu_seqlens", torch.tensor([0, 4, 3])), ValueError, "visual_cu_seqlens"),
    "image_request_length": (_set("image_request", torch.tensor([0])), ValueError, "image_request"),
    "image_insert_at_length": (_set("image_insert_at", torch.tensor([1, 1, 1])), ValueError, "image_insert_at"),
    "image_request_out_of_range": (_set("image_request", torch.tensor([0, 2])), ValueError, "image_request[1]"),
    "image_request_negative": (_set("image_request", torch.tensor([-1, 0])), ValueError, "image_request[0]"),
    "image_request_decreasing": (_set("image_request", torch.tensor([1, 0])), ValueError, "image_request"),
    "insert_beyond_text": (_set("image_insert_at", torch.tensor([1, 3])), ValueError, "image_insert_at[1]"),
    "insert_negative": (_set("image_insert_at", torch.tensor([-1, 0])), ValueError, "image_insert_at[0]"),
    "insert_decreasing": (
        lambda a: a.update(image_request=torch.tensor([0, 0]), image_insert_at=torch.tensor([2, 1])),
        ValueError, "image_insert_at"),
    "index_on_other_device": (_set("image_request", lambda a: a["image_request"].to("meta")), ValueError, "image_request"),
    "empty_request": (
        lambda a: a.update(
            text_embeds=a["text_embeds"][:3], text_positions=a["text_positions"][:3],
            text_cu_seqlens=torch.tensor([0, 3, 3]), image_request=torch.tensor([0, 0]),
            image_insert_at=torch.tensor([1, 2])),
        ValueError, "request 1"),
}


@pytest.mark.parametrize("entry", list(ERRORS))
@pytest.mark.parametrize(
    "fn", [pack_varlen, pack_varlen_reference], ids=["pack_varlen", "reference"]
)
def test_argument_errors(fn, entry):
    if fn is pack_varlen and not packing.extension_available() and not packing.cuda_extension_expected():
        pytest.skip("autoselect_fast._C is not built")
    mutate, exc, needle = ERRORS[entry]
    # Request 0: 3 text tokens, one image of 2 after token 1; request 1: 2 text tokens, one image of 2.
    args = make_batch([(3, [(1, 2)]), (2, [(2, 2)])])
    mutate(args)
    with pytest.raises(exc) as info:
        fn(**args)
    assert needle in str(info.value), str(info.value)


# --------------------------------------------------------------------------------------------------
# CUDA: the same checks on the GPU
# --------------------------------------------------------------------------------------------------


@requires_extension
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: torch.cuda.is_available() is False")
class TestCuda:
    def test_extension_is_built_with_cuda(self):
        assert packing.extension_available(), f"autoselect_fast._C did not import: {packing._C_IMPORT_ERROR}"
        assert packing._C.built_with_cuda(), "autoselect_fast._C was built without its CUDA path on a CUDA build of torch"

    @pytest.mark.parametrize("mrope", [False, True], ids=["pos1d", "pos3d"])
    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    @pytest.mark.parametrize("case", list(CASES))
    def test_matches_reference(self, case, dtype, mrope):
        args = make_batch(CASES[case], dtype=dtype, mrope=mrope, device="cuda")
        got = pack_varlen(**args)
        assert got.embeds.is_cuda and got.cu_seqlens.is_cuda and got.last_token_index.is_cuda
        assert_same(got, pack_varlen_reference(**args))

    def test_matches_cpu_extension_large(self):
        requests = random_requests(16, seed=3, text=(20, 200), images=(1, 2), kept=(64, 576))
        cpu_args = make_batch(requests, hidden=4096, dtype=torch.float16, mrope=True)
        cuda_args = {name: t.cuda() for name, t in cpu_args.items()}
        got, want = pack_varlen(**cuda_args), pack_varlen(**cpu_args)
        assert_same(PackedBatch(*(x.cpu() if torch.is_tensor(x) else x for x in vars(got).values())), want)

    def test_index_tensors_on_gpu(self):
        args = make_batch(CASES["b16_mixed"], dtype=torch.bfloat16, device="cuda")
        cpu_index = {n: args[n].cpu() for n in ("text_cu_seqlens", "visual_cu_seqlens")}
        assert_same(pack_varlen(**args), pack_varlen_reference(**{**args, **cpu_index}))

    def test_unaligned_rows(self):
        # Odd row size and a base pointer off by one element: the narrow-vector paths of the kernel.
        args = make_batch(CASES["several_images_one_request"], hidden=5, dtype=torch.float16, device="cuda")
        args["text_embeds"] = torch.cat([args["text_embeds"].new_zeros(1, 5), args["text_embeds"]])[1:]
        assert_same(pack_varlen(**args), pack_varlen_reference(**args))

    def test_runs_on_current_stream(self):
        args = make_batch(CASES["b16_mixed"], hidden=256, dtype=torch.float16, device="cuda")
        want = pack_varlen_reference(**args)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            got = pack_varlen(**args)
        stream.synchronize()
        assert_same(got, want)
