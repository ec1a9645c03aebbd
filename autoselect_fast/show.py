"""``autoselect-fast show``: a picture of what the Scorer keeps, and why it is not redundant.

Writes one PNG with, side by side:

* the image once per view of the model (LLaVA-1.5: one; LLaVA-NeXT: the base tile and the crop grid,
  which both cover the whole image): dropped tokens' regions are darkened, kept tokens' regions are
  left as they are and outlined;
* the cosine-similarity matrix of the pre-projector features of the K highest-scoring tokens (best
  first) followed by the K lowest-scoring ones (worst last), as in the paper's Figure 4: kept tokens
  tend to be dissimilar to each other, dropped ones similar.

Which region of the image a token looks at is model specific and comes from the adapter
(``VLMAdapter.token_regions``). The image panels are drawn with Pillow at known offsets, so
:func:`run_show` can return where every token landed in the PNG.
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import torch

from .engine import AutoSelectEngine, Request
from .local_checkpoint import check_inputs
from .validation import DTYPES

PANEL_SIZE = 384  # longest side of each image panel, pixels
MARGIN = 12
TITLE_HEIGHT = 40
DROPPED_DIM = 0.35  # dropped regions keep this fraction of their brightness
KEPT_OUTLINE = (255, 200, 0)
BACKGROUND = (255, 255, 255)


@dataclass
class ShowSettings:
    model: str
    scorer: str
    image: str
    keep: int
    out: str
    device: torch.device = torch.device("cpu")
    dtype: str = "fp32"
    progress: bool = True


def cosine_similarity_matrix(features: torch.Tensor) -> torch.Tensor:
    """``(M, d)`` -> ``(M, M)`` cosine similarities, computed in float32."""
    unit = torch.nn.functional.normalize(features.float(), dim=-1)
    return unit @ unit.T


def rank_tokens(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(top, bottom)``: the K best token indices (best first) and the min(K, N-K) worst (worst last).

    Ties go to the lower index, as in the selection."""
    n = scores.numel()
    order = torch.argsort(scores.float().cpu(), descending=True, stable=True)
    bottom_k = min(k, n - k)
    return order[:k], order[n - bottom_k:]


def _matrix_image(sim: torch.Tensor, k: int, height: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    dpi = 100
    fig, ax = plt.subplots(figsize=(height * 1.15 / dpi, height / dpi), dpi=dpi)
    shown = ax.imshow(sim.numpy(), cmap="viridis", vmin=-1, vmax=1, interpolation="nearest")
    m = sim.shape[0]
    if k < m:
        for draw in (ax.axhline, ax.axvline):
            draw(k - 0.5, color="white", linewidth=1)
    ax.set_xticks([(k - 1) / 2, k + (m - k - 1) / 2] if k < m else [(k - 1) / 2])
    ax.set_xticklabels([f"top {k}", f"bottom {m - k}"] if k < m else [f"top {k}"], fontsize=8)
    ax.set_yticks(ax.get_xticks())
    ax.set_yticklabels(ax.get_xticklabels(), fontsize=8, rotation=90, va="center")
    ax.set_title("cosine similarity of features", fontsize=9)
    fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    plt.close(fig)
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


def render(image, regions, kept: torch.Tensor, sim: torch.Tensor, k: int, title: str):
    """The composite picture and, per token, its box in the picture's pixels (NaN: no region)."""
    from PIL import Image, ImageDraw

    w, h = image.size
    scale = PANEL_SIZE / max(w, h)
    pw, ph = max(1, round(w * scale)), max(1, round(h * scale))
    base = image.resize((pw, ph), Image.BICUBIC)
    dimmed = Image.eval(base, lambda v: int(v * DROPPED_DIM))
    is_kept = torch.zeros(regions.boxes.shape[0], dtype=torch.bool)
    is_kept[kept] = True
    views = len(regions.view_names)
    matrix = _matrix_image(sim, k, max(ph, int(PANEL_SIZE * 0.8)))
    width = MARGIN + views * (pw + MARGIN) + matrix.width + MARGIN
    height = TITLE_HEIGHT + max(ph, matrix.height) + MARGIN
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw_canvas = ImageDraw.Draw(canvas)
    draw_canvas.text((MARGIN, 6), title, fill=(0, 0, 0))
    placed = torch.full_like(regions.boxes, float("nan"))
    for v, name in enumerate(regions.view_names):
        x_off, y_off = MARGIN + v * (pw + MARGIN), TITLE_HEIGHT
        in_view = regions.view == v
        # darken the dropped tokens' regions, then restore the kept ones (regions may overlap at edges)
        mask = Image.new("L", (pw, ph), 0)
        draw_mask = ImageDraw.Draw(mask)
        boxes = regions.boxes * scale
        # whole pixels: neighbours share an edge, so no undimmed seams between dropped regions
        pixels = boxes.nan_to_num(0).round().long()
        for fill, selected in ((255, in_view & ~is_kept), (0, in_view & is_kept)):
            for x0, y0, x1, y1 in pixels[selected].tolist():
                if x1 > x0 and y1 > y0:
                    draw_mask.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill)
        panel = Image.composite(dimmed, base, mask)
        draw_panel = ImageDraw.Draw(panel)
        for x0, y0, x1, y1 in pixels[in_view & is_kept].tolist():
            if x1 > x0 and y1 > y0:
                draw_panel.rectangle((x0, y0, x1 - 1, y1 - 1), outline=KEPT_OUTLINE, width=1)
        canvas.paste(panel, (x_off, y_off))
        draw_canvas.text((x_off, TITLE_HEIGHT - 14), name, fill=(60, 60, 60))
        placed[in_view] = boxes[in_view] + torch.tensor([x_off, y_off, x_off, y_off], dtype=boxes.dtype)
    canvas.paste(matrix, (MARGIN + views * (pw + MARGIN), TITLE_HEIGHT))
    return canvas, placed


def run_show(settings: ShowSettings) -> dict:
    """Check inputs, load, score the image, write the PNG; returns the figures and token placements."""
    say = print if settings.progress else (lambda *a, **k: None)
    checked = check_inputs(settings.model, settings.scorer, settings.image, settings.keep, None)
    checkpoint, scorer, image, num_tokens, keep = checked.checkpoint, checked.scorer, checked.image, checked.num_tokens, checked.keep
    adapter = checkpoint.skeleton_adapter
    try:
        adapter.token_regions((image.height, image.width), checkpoint.image_processor)
    except NotImplementedError as exc:
        from .preflight import UsageError

        raise UsageError(f"--model {settings.model}: {exc}") from None
    say(f"[1/3] checked: {checkpoint.model_class.__name__}, image {image.width}x{image.height} -> N = {num_tokens} visual tokens, keep K = {keep}")

    say("[2/3] loading")
    dtype = DTYPES[settings.dtype]
    model = checkpoint.load_model(settings.device, dtype, progress=settings.progress)
    engine = AutoSelectEngine(model, scorer.to(device=settings.device, dtype=dtype), keep=keep, image_processor=checkpoint.image_processor)

    say("[3/3] scoring and drawing")
    batch = engine.prepare(Request([engine.adapter.image_token_id], image=image))
    features = engine.encode_images(batch.pixel_values, batch.image_sizes)[0]
    pruned = engine.prune([features], batch.budgets)
    kept = pruned.kept_indices()[0].cpu()
    scores = engine.score([features])[0].float().cpu()
    top, bottom = rank_tokens(scores, keep)
    sim = cosine_similarity_matrix(features[torch.cat([top, bottom]).to(features.device)]).cpu()
    regions = engine.adapter.token_regions((image.height, image.width), engine.image_processor)
    off_diagonal = ~torch.eye(keep, dtype=torch.bool)
    top_mean = float(sim[:keep, :keep][off_diagonal].mean()) if keep > 1 else float("nan")
    nb = bottom.numel()
    bottom_mean = float(sim[keep:, keep:][~torch.eye(nb, dtype=torch.bool)].mean()) if nb > 1 else float("nan")
    title = f"{checkpoint.model_class.__name__}: kept K = {keep} of N = {num_tokens} visual tokens (outlined; dropped ones darkened)"
    picture, placed = render(image, regions, kept, sim, keep, title)
    picture.save(settings.out)
    print(f"kept {keep} of {num_tokens} tokens; mean cosine similarity among the top {keep}: {top_mean:.3f}, among the bottom {nb}: {bottom_mean:.3f}")
    print(f"PNG: {settings.out} ({picture.width}x{picture.height})")
    return {
        "out": settings.out, "size": picture.size, "keep": keep, "visual_tokens": num_tokens, "kept": kept,
        "scores": scores, "top": top, "bottom": bottom, "similarity": sim, "boxes_in_png": placed,
        "view": regions.view, "view_names": regions.view_names,
        "mean_similarity": {"top": top_mean, "bottom": bottom_mean},
    }
