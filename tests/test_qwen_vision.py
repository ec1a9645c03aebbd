"""Qwen2.5-VL's vision tower with one varlen attention call per block, and M-RoPE positions without
``get_rope_index`` (``autoselect_fast.models.qwen2_5_vl_vision``, ``Qwen2_5_VLAdapter.sequence_positions``).

Model: the real ``Qwen2_5_VLForConditionalGeneration``, random weights; vision depth 3 (blocks 0 and 2
windowed, block 1 full attention), hidden 64, 4 heads (head dim 16), 14 px patches, 2x2 merge, window
84 px = 3x3 merge groups, so grids that are not multiples of the window get cut windows at their edges.
Images: grids (1, 16, 24) (8x12 groups, 12 windows), (1, 8, 8) (4 windows) and (1, 20, 12) (8 windows),
random patches. References: transformers' own tower (``model.model.visual``, sdpa: its per-window
loop) and ``get_rope_index``. Tolerance: fp32, rtol = atol = 1e-5.

Private names used here: this file is the unit test of the tower's private per-grid caches and rotary
tables (``_rotary_tables``, ``_plans``, ``_grids``) and of the adapter's per-grid M-RoPE table
(``_rope_table``).
"""
import pytest
import torch
import torch.nn.functional as F
from test_engine_qwen import IMAGE, TEXT, VIDEO, VISION_END, VISION_START
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

import autoselect_fast.models.qwen2_5_vl_vision as vision_module
from autoselect_fast.attention import backend_unavailable_reason, varlen_attention
from autoselect_fast.models import get_adapter
from autoselect_fast.models.qwen2_5_vl_vision import PatchBucket, QwenVisionTower

TOL = dict(rtol=1e-5, atol=1e-5)
VISION = dict(depth=3, hidden_size=64, intermediate_size=96, num_heads=4, out_hidden_size=64, spatial_merge_size=2,
              patch_size=14, temporal_patch_size=2, window_size=84, fullatt_block_indexes=[1])
GRIDS = [(1, 16, 24), (1, 8, 8), (1, 20, 12)]
PATCH_DIM = 3 * 2 * 14 * 14
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")


def transformers_window_index(grids):
    """transformers' own window index and window offsets (``transformers.vision_utils``, 5.24)."""
    vision_utils = pytest.importorskip("transformers.vision_utils")
    return vision_utils.get_vision_window_index(torch.tensor(grids), spatial_merge_size=2, window_size=84, patch_size=14)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = Qwen2_5_VLConfig(vision_config=VISION, text_config=TEXT, image_token_id=IMAGE, video_token_id=VIDEO,
                              vision_start_token_id=VISION_START, vision_end_token_id=VISION_END)
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def patches_of(grids, seed=0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(t * h * w, PATCH_DIM, generator=gen) for t, h, w in grids]


def transformers_tower(model, pixels, grids):
    with torch.no_grad():
        return model.model.visual(torch.cat(pixels), grid_thw=torch.tensor(grids))


# --------------------------------------------------------------------------------------------------
# The tower
# --------------------------------------------------------------------------------------------------
def test_tower_equals_transformers_on_images_of_different_grids(model):
    pixels = patches_of(GRIDS)
    expected = transformers_tower(model, pixels, GRIDS)
    tower = QwenVisionTower(model.model.visual)
    plan = tower.plan(GRIDS)
    # the cached per-grid metadata equals transformers' own index helper, several windows per image
    assert [len(tower.grid_metadata(g).window_lengths) for g in GRIDS] == [12, 4, 8]
    assert plan.cu_full.tolist() == [0, 384, 448, 688]
    assert (plan.max_window, plan.max_full) == (36, 384)
    with torch.no_grad():
        hidden = tower.forward(tower.pack(pixels, plan), plan)
        groups = tower.raster_groups(hidden, plan)
        merged = [model.model.visual.merger(g.reshape(-1, 64)) for g in groups]
    torch.testing.assert_close(hidden, expected.last_hidden_state, **TOL)  # window order
    assert [g.shape[0] for g in groups] == [96, 16, 60]
    torch.testing.assert_close(torch.cat(merged), expected.pooler_output, **TOL)  # raster order


def test_grid_metadata_equals_transformers_window_index(model):
    plan = QwenVisionTower(model.model.visual).plan(GRIDS)
    window_index, cu_window = transformers_window_index(GRIDS)
    assert torch.equal(plan.window_index, window_index)
    assert torch.equal(plan.cu_window, cu_window)
    assert not torch.equal(window_index, torch.arange(window_index.numel()))


def test_tower_with_a_two_frame_grid(model):
    """t > 1 (the adapter takes still images only, the tower's metadata follows transformers for any t)."""
    grids = [(2, 8, 12), (1, 8, 8)]
    pixels = patches_of(grids, seed=7)
    tower = QwenVisionTower(model.model.visual)
    plan = tower.plan(grids)
    assert plan.cu_full.tolist() == [0, 96, 192, 256]  # one full-attention segment per frame
    with torch.no_grad():
        hidden = tower.forward(tower.pack(pixels, plan), plan)
    torch.testing.assert_close(hidden, transformers_tower(model, pixels, grids).last_hidden_state, **TOL)


def test_one_varlen_call_per_block(model, monkeypatch):
    calls = []

    def counting(query, key, value, cu_q, cu_k, max_q, max_k, **kwargs):
        calls.append((cu_q.numel() - 1, max_q, kwargs["causal"]))
        return varlen_attention(query, key, value, cu_q, cu_k, max_q, max_k, **kwargs)

    tower = QwenVisionTower(model.model.visual)
    monkeypatch.setattr(vision_module, "varlen_attention", counting)
    with torch.no_grad():
        tower.encode(patches_of(GRIDS), GRIDS)
    # windowed blocks: the 24 windows of all three images; the full-attention block: the three images
    assert calls == [(24, 36, False), (3, 384, False), (24, 36, False)]


def test_adapter_encode_is_the_tower_in_raster_group_order(model):
    adapter = get_adapter(model)
    pixels = patches_of(GRIDS, seed=1)
    expected = transformers_tower(model, pixels, GRIDS)
    with torch.no_grad():
        features = adapter.encode(pixels, [torch.tensor(g) for g in GRIDS])
        hidden, window_index = adapter.pre_merger_states(torch.cat(pixels), torch.tensor(GRIDS))
    torch.testing.assert_close(hidden, expected.last_hidden_state, **TOL)
    raster = expected.last_hidden_state.view(-1, 4 * 64)[torch.argsort(window_index)]
    torch.testing.assert_close(torch.cat(features), raster, **TOL)
    assert [f.shape for f in features] == [(96, 256), (16, 256), (60, 256)]
    with torch.no_grad():
        merged = adapter.project(torch.cat(features))
    torch.testing.assert_close(merged, expected.pooler_output, **TOL)


def test_metadata_is_cached_per_grid_and_bounded(model):
    tower = QwenVisionTower(model.model.visual, grid_cache_size=2, plan_cache_size=2)
    first = tower.grid_metadata((1, 16, 24))
    assert tower.grid_metadata([1, 16, 24]) is first
    plan = tower.plan(GRIDS[:2])
    assert tower.plan(GRIDS[:2]) is plan
    # the batch's metadata is the grids' metadata with offsets: the second image's windows follow the first's
    second = tower.grid_metadata((1, 8, 8))
    assert torch.equal(plan.window_index, torch.cat([first.window_index, second.window_index + first.groups]))
    assert torch.equal(tower._rotary_tables(torch.cat([first.positions, second.positions]))[0], plan.cos)
    tower.plan([(1, 4, 4)])
    tower.plan([(1, 6, 4)])
    assert len(tower._plans) == 2 and len(tower._grids) == 2  # bounded
    assert tower.plan(GRIDS[:2]) is not plan  # evicted, rebuilt
    with pytest.raises(ValueError, match=r"grids\[0\] \(1, 5, 4\): h and w must be multiples of spatial_merge_size=2"):
        tower.plan([(1, 5, 4)])
    with pytest.raises(ValueError, match="grids must hold at least one"):
        tower.plan([])


# --------------------------------------------------------------------------------------------------
# Patch-budget buckets
# --------------------------------------------------------------------------------------------------
def test_padding_to_a_bucket_does_not_change_real_outputs(model):
    tower = QwenVisionTower(model.model.visual)
    bucket = PatchBucket(patches=1024, window_segments=48, full_segments=24)
    pixels = patches_of(GRIDS, seed=2)
    with torch.no_grad():
        exact = tower.encode(pixels, GRIDS)
        padded = tower.encode(pixels, GRIDS, bucket=bucket)
        plan = tower.plan(GRIDS, bucket=bucket)
        hidden = tower.forward(tower.pack(pixels, plan), plan)
    for a, b in zip(padded, exact):
        torch.testing.assert_close(a, b, **TOL)
    # fixed shapes: 1024 rows, cu_seqlens of 48 + 1 and 24 + 1 entries, max_seqlen fixed per bucket;
    # the 336 padding patches are chunks of one window (36) in every block, then zero-length segments
    assert plan.patches == 1024 and plan.real_patches == 688
    assert (plan.cu_window.numel(), plan.cu_full.numel(), plan.max_window, plan.max_full) == (49, 25, 36, 1024)
    lengths = (plan.cu_window[1:] - plan.cu_window[:-1]).tolist()
    assert lengths[24:34] == [36] * 9 + [12] and lengths[34:] == [0] * 14
    assert (plan.cu_full[1:] - plan.cu_full[:-1]).tolist() == [384, 64, 240] + [36] * 9 + [12] + [0] * 11
    assert torch.isfinite(hidden).all()
    # another batch in the same bucket has the same shapes: one captured graph replays both
    other = tower.plan([(1, 28, 16), (1, 4, 6)], bucket=bucket)
    for name in ("window_index", "raster_index", "cu_window", "cu_full", "cos", "sin"):
        assert getattr(other, name).shape == getattr(plan, name).shape, name
    assert (other.max_window, other.max_full) == (plan.max_window, plan.max_full)


def test_a_plan_copied_into_bucket_buffers_runs_like_the_plan(model):
    tower = QwenVisionTower(model.model.visual)
    bucket = tower.bucket(766, frames=4)
    assert bucket == PatchBucket(patches=768, window_segments=192, full_segments=4 + 22)  # 768 = 21 x 36 + 12
    buffers = tower.plan_buffers(bucket)
    assert buffers.real_patches == 0 and buffers.patches == 768
    pixels = patches_of(GRIDS, seed=3)
    plan = tower.plan(GRIDS, bucket=bucket)
    staged = plan.copy_into(buffers)
    assert staged.cu_window is buffers.cu_window and staged.group_counts == plan.group_counts
    with torch.no_grad():
        expected = tower.raster_groups(tower.forward(tower.pack(pixels, plan), plan), plan)
        got = tower.raster_groups(tower.forward(tower.pack(pixels, staged), staged), staged)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="same bucket"):
        tower.plan(GRIDS).copy_into(buffers)


def test_bucket_errors_name_the_limit(model):
    tower = QwenVisionTower(model.model.visual)
    with pytest.raises(ValueError, match="more than bucket.patches=512"):
        tower.plan(GRIDS, bucket=PatchBucket(512, 64, 16))
    with pytest.raises(ValueError, match="multiple of merge²=4"):
        tower.plan(GRIDS, bucket=PatchBucket(1022, 64, 16))
    with pytest.raises(ValueError, match="needs 34 window_segments .* more than bucket.window_segments=30"):
        tower.plan(GRIDS, bucket=PatchBucket(1024, 30, 16))
    # the helper's bucket fits the worst batches: one-group images (a window each), then all padding
    bucket = tower.bucket(64, frames=16)
    assert tower.plan([(1, 2, 2)] * 16, bucket=bucket).cu_window.numel() == bucket.window_segments + 1
    assert tower.plan_buffers(bucket).cu_full.numel() == bucket.full_segments + 1
    with pytest.raises(ValueError, match="PatchBucket.full_segments must be an int >= 1"):
        PatchBucket(1024, 30, 0)
    with pytest.raises(ValueError, match="pixel_values hold 64 patches but the grids"):
        tower.encode(patches_of([(1, 8, 8)]), [(1, 8, 10)])


def test_forward_reads_nothing_on_the_host_besides_the_attention_kernel(model, monkeypatch):
    """Traced with torch.compile(fullgraph=True), with a device-only stand-in for the varlen kernel
    (block-diagonal dense attention from ``cu_seqlens`` by ``searchsorted``): no host read in the graph."""
    from test_host_sync import host_reads, trace

    def device_only_attention(query, key, value, cu_q, cu_k, max_q, max_k, *, scale, backend, causal):
        positions = torch.arange(query.shape[0], device=query.device, dtype=cu_q.dtype)
        segment = torch.searchsorted(cu_q, positions, right=True)
        mask = segment[:, None] == segment[None, :]
        out = F.scaled_dot_product_attention(query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1), attn_mask=mask, scale=scale)
        return out.transpose(0, 1)

    tower = QwenVisionTower(model.model.visual)
    bucket = PatchBucket(patches=1024, window_segments=48, full_segments=16)
    plan = tower.plan(GRIDS, bucket=bucket)
    patches = tower.pack(patches_of(GRIDS, seed=4), plan)
    monkeypatch.setattr(vision_module, "varlen_attention", device_only_attention)
    monkeypatch.setattr(vision_module, "resolve_backend", lambda backend, device, dtype: "torch_varlen")
    with torch.no_grad():
        graphs, out = trace(lambda p: tower.forward(p, plan), patches)
        monkeypatch.undo()
        expected = tower.forward(patches, plan)
    assert len(graphs) == 1 and host_reads(graphs[0]) == []
    real = plan.raster_index[: plan.real_groups]
    torch.testing.assert_close(out.view(-1, 256)[real], expected.view(-1, 256)[real], **TOL)


# --------------------------------------------------------------------------------------------------
# Varlen attention without a causal mask, with empty segments
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_bidirectional_varlen_attention_with_empty_segments(kv_heads):
    gen = torch.Generator().manual_seed(0)
    lengths = [5, 0, 9, 3, 0, 0]
    total = sum(lengths)
    q = torch.randn(total, 4, 8, generator=gen)
    k, v = (torch.randn(total, kv_heads, 8, generator=gen) for _ in range(2))
    cu = torch.tensor([0, 5, 5, 14, 17, 17, 17], dtype=torch.int32)
    out = varlen_attention(q, k, v, cu, backend="sdpa", causal=False, scale=0.3)
    expected = []
    for s, e in ((0, 5), (5, 14), (14, 17)):
        kk, vv = (t[s:e].double().repeat_interleave(4 // kv_heads, dim=1) for t in (k, v))
        weights = torch.einsum("qhd,khd->hqk", q[s:e].double(), kk).mul(0.3).softmax(-1)
        expected.append(torch.einsum("hqk,khd->qhd", weights, vv))
    torch.testing.assert_close(out.double(), torch.cat(expected), **TOL)
    # the causal path takes empty segments too and equals the run without them
    dense_cu = torch.tensor([0, 5, 14, 17], dtype=torch.int32)
    torch.testing.assert_close(varlen_attention(q, k, v, cu, backend="sdpa"), varlen_attention(q, k, v, dense_cu, backend="sdpa"), rtol=0, atol=0)
    with pytest.raises(TypeError, match="causal must be a bool"):
        varlen_attention(q, k, v, cu, backend="sdpa", causal=None)


# --------------------------------------------------------------------------------------------------
# M-RoPE positions
# --------------------------------------------------------------------------------------------------
def rope_index(model, ids, grids):
    ids = torch.tensor(ids)[None]
    grid_thw = torch.tensor(grids) if grids else None
    positions, _ = model.model.get_rope_index(ids, (ids == IMAGE).to(torch.int32), image_grid_thw=grid_thw)
    return positions[:, 0]


def expanded(*pieces) -> list[int]:
    """Text pieces (lists of ids) and images (grids) in order, each image as its run of N tokens."""
    ids = []
    for piece in pieces:
        ids += [IMAGE] * (piece[0] * piece[1] * piece[2] // 4) if isinstance(piece, tuple) else piece
    return ids


@pytest.mark.parametrize("pieces", [
    ([1, 2, 3, VISION_START], (1, 16, 24), [VISION_END, 7, 8], (1, 8, 8), [9], (1, 20, 12), [10, 11, 12]),  # between, after
    ((1, 20, 12), [4, 5, 6]),  # image first: no text before
    ([4, 5], (1, 4, 28)),  # image last, wide
    ([4] * 7, (1, 2, 2), [5], (1, 30, 6), [6, 7]),  # one-group image, tall image
    ([1, 2, 3, 4, 5, 6],),  # text only
])
def test_mrope_positions_equal_get_rope_index(model, pieces):
    adapter = get_adapter(model)
    ids = expanded(*pieces)
    grids = [p for p in pieces if isinstance(p, tuple)]
    got = adapter.sequence_positions(torch.tensor(ids), grids)
    assert got.dtype == torch.int64 and got.shape == (3, len(ids))
    assert torch.equal(got, rope_index(model, ids, grids))


def test_mrope_tables_are_cached_and_bad_layouts_refused(model):
    adapter = get_adapter(model)
    ids = expanded([1, 2], (1, 8, 8), [3])
    adapter.sequence_positions(torch.tensor(ids), [(1, 8, 8)])
    entry = adapter._rope_table((1, 8, 8))
    assert adapter._rope_table((1, 8, 8)) is entry
    table, advance = entry  # merged grid 4 x 4: rows (t, row, col), then the offset moves on by 4
    assert table[:, :6].tolist() == [[0] * 6, [0, 0, 0, 0, 1, 1], [0, 1, 2, 3, 0, 1]] and advance == 4
    with pytest.raises(ValueError, match="hold 16 image tokens but the images' grids take 20"):
        adapter.sequence_positions(torch.tensor(ids), [(1, 8, 10)])
    split = ids[:10] + [3] + ids[10:]
    with pytest.raises(ValueError, match="each image's tokens as one run"):
        adapter.sequence_positions(torch.tensor(split), [(1, 8, 8)])


# --------------------------------------------------------------------------------------------------
# CUDA (run whenever a GPU is present)
# --------------------------------------------------------------------------------------------------
def cuda_backends() -> list[str]:
    if not torch.cuda.is_available():
        return []
    return [b for b in ("torch_varlen", "flash_attn") if backend_unavailable_reason(b, torch.device("cuda"), torch.float16) is None]


@requires_cuda
def test_cuda_fp32_with_a_half_only_backend_is_refused(model):
    tower = QwenVisionTower(model.model.visual.cuda(), backend="torch_varlen")
    try:
        with pytest.raises(ValueError, match="attention_backend='torch_varlen' cannot run here: .*float16 or bfloat16"):
            tower.encode(patches_of(GRIDS[:1]), GRIDS[:1])
    finally:
        model.model.visual.cpu()


@requires_cuda
@pytest.mark.parametrize("backend", cuda_backends() or ["none"])
def test_cuda_half_tower_and_graph_replay(model, backend):
    if backend == "none":
        pytest.skip("no varlen kernel backend on this CUDA machine")
    visual = model.model.visual.to("cuda", torch.float16)
    try:
        tower = QwenVisionTower(visual, backend=backend)
        pixels = patches_of(GRIDS, seed=5)
        expected = transformers_tower(model, [p.cuda().half() for p in pixels], GRIDS)
        bucket = PatchBucket(patches=1024, window_segments=48, full_segments=24)
        with torch.no_grad():
            plan = tower.plan(GRIDS, bucket=bucket)
            eager = tower.forward(tower.pack(pixels, plan), plan)
            window_groups = expected.last_hidden_state.view(-1, 256)
            torch.testing.assert_close(eager.view(-1, 256)[: plan.real_groups].float(), window_groups.float(), rtol=2e-2, atol=2e-2)
            # capture on bucket buffers, replay another batch copied in: equals its eager run
            buffers = tower.plan_buffers(bucket)
            static = torch.zeros(bucket.patches, PATCH_DIM, device="cuda", dtype=torch.float16)
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                tower.forward(static, buffers)  # warm-up
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                captured = tower.forward(static, buffers)
            other_grids = [(1, 28, 16), (1, 4, 6)]
            other = tower.plan(other_grids, bucket=bucket)
            other_pixels = patches_of(other_grids, seed=6)
            staged = other.copy_into(buffers)
            static.copy_(tower.pack(other_pixels, other))
            torch.cuda.set_sync_debug_mode("error")
            try:
                graph.replay()
                replayed = tower.raster_groups(captured, staged)
            finally:
                torch.cuda.set_sync_debug_mode("default")
            reference = tower.raster_groups(tower.forward(tower.pack(other_pixels, other), other), other)
        for a, b in zip(replayed, reference):
            torch.testing.assert_close(a.float(), b.float(), rtol=1e-3, atol=1e-3)
    finally:
        visual.to("cpu", torch.float32)
