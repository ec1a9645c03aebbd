"""Budget policy: how many visual tokens K each image keeps (one rule for the engine, the trainer, the CLI
and the vLLM plugin).

``keep`` fixes K per image, ``keep_ratio`` makes it a fraction of the image's N (``K = max(1, round(r·N))``,
docs/design.md, "Model rules"); :func:`check_budget_args` checks the pair, :func:`check_keep_fits` checks ``keep`` against a model
whose N is fixed, :func:`image_budget` applies it.
"""
from __future__ import annotations

from typing import Optional

from .validation import is_int, is_number


def check_budget_args(keep: Optional[int], keep_ratio: Optional[float], *, required: bool) -> None:
    """``keep`` (K per image, an int >= 1) or ``keep_ratio`` (a fraction of N in (0, 1]), never both;
    ``required``: exactly one must be given (otherwise neither means every token)."""
    if required and (keep is None) == (keep_ratio is None):
        raise ValueError(f"give exactly one of keep (K per image) and keep_ratio, got keep={keep!r}, keep_ratio={keep_ratio!r}")
    if keep is not None and keep_ratio is not None:
        raise ValueError(f"give keep or keep_ratio, not both (got keep={keep!r}, keep_ratio={keep_ratio!r})")
    if keep is not None and (not is_int(keep) or keep < 1):
        neither = "" if required else " (or None to keep every token)"
        raise ValueError(f"keep must be an int >= 1{neither}, got {keep!r}")
    if keep_ratio is not None and (not is_number(keep_ratio) or not 0 < keep_ratio <= 1):
        raise ValueError(f"keep_ratio must be a float in (0, 1], got {keep_ratio!r}")


def image_budget(num_tokens: int, keep: Optional[int] = None, keep_ratio: Optional[float] = None, *,
                 clip: bool = False, where: Optional[str] = None) -> int:
    """K for an image of N = ``num_tokens`` visual tokens: ``keep``, or ``K = max(1, round(keep_ratio·N))``.

    A fixed ``keep > N`` is clipped to N when ``clip`` (models whose N follows the image's resolution),
    else a ValueError naming ``where`` (default: "the image"). Neither given: every token.
    """
    if keep is not None:
        if keep <= num_tokens:
            return keep
        if clip:
            return num_tokens
        tokens = f"the image's {num_tokens} visual tokens" if where is None else f"the {num_tokens} visual tokens of {where}"
        raise ValueError(f"keep={keep} exceeds {tokens}; allowed: 1 <= keep <= {num_tokens}")
    if keep_ratio is not None:
        return max(1, round(keep_ratio * num_tokens))
    return num_tokens


def check_keep_fits(keep: Optional[int], adapter) -> None:
    """Refuse a fixed ``keep`` above N before any image is seen, where the model (its ``VLMAdapter``) gives
    every image the same N and does not clip: the error would otherwise come with the first request."""
    fixed = adapter.fixed_num_tokens
    if keep is not None and fixed is not None and not adapter.clips_keep_to_tokens:
        image_budget(fixed, keep, where="every image of this model")
