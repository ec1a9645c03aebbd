"""Varlen packing of a batch's text and kept visual tokens (docs/design.md, "Varlen packing format").

This module owns the packing API the engine calls:

* :func:`pack_varlen` checks its arguments, then runs the C++/CUDA extension ``autoselect_fast._C``
  (``csrc/``) on the inputs' device;
* :func:`pack_varlen_reference` is the spec in code: a plain PyTorch loop with the same signature
  and result;
* :class:`PackedBatch` is the result, the input format of FlashAttention's varlen kernels
  (``flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, causal=True)``).

Request ``r``'s packed sequence is its text tokens with each of its images' kept tokens inserted
after ``image_insert_at[i]`` of its text tokens, in sequence order::

    text[0:insert_at[a]], image a, text[insert_at[a]:insert_at[b]], image b, ..., text[insert_at[last]:]

Images sharing an insert point go in image order. Position ids are copied, never recomputed: the
selection step emits the kept tokens' original (or compact) positions and the caller supplies the
text's (docs/design.md, "Position ids").

Synchronisation: the index tensors (offsets, image_request, image_insert_at) are read on the host
once, in one device-to-host copy when they live on the GPU (none when they are CPU tensors, the
usual case). The extension then computes every table on the host, uploads it with one asynchronous
copy and launches one kernel on the caller's current stream.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

try:  # built by `pip install --no-build-isolation -e .`; absent in an unbuilt source tree
    from autoselect_fast import _C
except ImportError as exc:  # kept to explain the failure when pack_varlen is called
    _C = None
    _C_IMPORT_ERROR: ImportError | None = exc
else:
    _C_IMPORT_ERROR = None

__all__ = ["PackedBatch", "pack_varlen", "pack_varlen_reference", "extension_available", "extension_error", "cuda_extension_expected"]

_INDEX_DTYPES = (torch.int32, torch.int64)
_INT32_MAX = 2**31 - 1


@dataclass
class PackedBatch:
    """A batch packed for varlen attention.

    embeds: (T, H), dtype and device of the inputs.
    cu_seqlens: (B+1,) int32, cu_seqlens[0] = 0; request r is rows cu_seqlens[r]:cu_seqlens[r+1].
    max_seqlen: length of the longest request.
    position_ids: (T,) int64, or (3, T) int64 for M-RoPE.
    last_token_index: (B,) int64, row of each request's last token in ``embeds``.
    """

    embeds: Tensor
    cu_seqlens: Tensor
    max_seqlen: int
    position_ids: Tensor
    last_token_index: Tensor


def extension_available() -> bool:
    """True when ``autoselect_fast._C`` is built and importable."""
    return _C is not None


def cuda_extension_expected() -> bool:
    """True on a CUDA build of torch with a GPU present: there the extension must exist with its CUDA path.

    ``pip install --no-build-isolation -e .`` compiles the CUDA path whenever torch is a CUDA build, so
    on such a machine a missing or CPU-only extension is a build failure to report, never a reason
    to skip tests or to fall back to the reference packer.
    """
    return bool(torch.version.cuda) and torch.cuda.is_available()


def extension_error() -> ImportError | None:
    """Why ``autoselect_fast._C`` cannot be used (an ImportError naming the build command), or None when it is built."""
    if _C is not None:
        return None
    error = ImportError(
        "autoselect_fast._C (the C++ varlen packing extension) is not built or cannot be loaded: "
        f"{_C_IMPORT_ERROR}. Build it from the repository root with "
        "`pip install --no-build-isolation -e .`"
    )
    error.__cause__ = _C_IMPORT_ERROR
    return error


def _extension():
    error = extension_error()
    if error is not None:
        raise error
    return _C


# --------------------------------------------------------------------------------------------------
# Argument checks (shared by pack_varlen and the reference: same contract)
# --------------------------------------------------------------------------------------------------


@dataclass
class _Index:
    """Host (CPU, int64, contiguous) copies of the index tensors, and the same as lists."""

    text_cu: Tensor
    visual_cu: Tensor
    image_request: Tensor
    image_insert_at: Tensor
    text_cu_list: list
    visual_cu_list: list
    image_request_list: list
    image_insert_at_list: list


def _check_tensor(name: str, value) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def _check_offsets(name: str, cu: list, total: int, total_name: str, min_len: int) -> None:
    if len(cu) < min_len:
        raise ValueError(f"{name} must have at least {min_len} entries, got {len(cu)}")
    if cu[0] != 0:
        raise ValueError(f"{name}[0] must be 0, got {cu[0]}")
    for k in range(len(cu) - 1):
        if cu[k + 1] < cu[k]:
            raise ValueError(
                f"{name} must be non-decreasing, got {name}[{k}] = {cu[k]} > {name}[{k + 1}] = {cu[k + 1]}"
            )
    if cu[-1] != total:
        raise ValueError(f"{name}[-1] must equal the number of rows of {total_name} ({total}), got {cu[-1]}")


def _check_args(
    text_embeds,
    text_cu_seqlens,
    text_positions,
    visual_embeds,
    visual_cu_seqlens,
    visual_positions,
    image_request,
    image_insert_at,
) -> _Index:
    """Raise TypeError/ValueError naming the argument for any input pack_varlen cannot pack."""
    names = (
        "text_embeds", "text_cu_seqlens", "text_positions", "visual_embeds", "visual_cu_seqlens",
        "visual_positions", "image_request", "image_insert_at",
    )
    values = (
        text_embeds, text_cu_seqlens, text_positions, visual_embeds, visual_cu_seqlens,
        visual_positions, image_request, image_insert_at,
    )
    for name, value in zip(names, values):
        _check_tensor(name, value)

    # Embeddings: (rows, H), one dtype, one device.
    for name, t in (("text_embeds", text_embeds), ("visual_embeds", visual_embeds)):
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D (rows, H), got shape {tuple(t.shape)}")
    if visual_embeds.dtype != text_embeds.dtype:
        raise TypeError(f"visual_embeds must have the dtype of text_embeds ({text_embeds.dtype}), got {visual_embeds.dtype}")
    if visual_embeds.shape[1] != text_embeds.shape[1]:
        raise ValueError(
            f"visual_embeds must have the hidden size of text_embeds ({text_embeds.shape[1]}), "
            f"got shape {tuple(visual_embeds.shape)} (with no images pass an empty (0, H) tensor)"
        )
    device = text_embeds.device
    if visual_embeds.device != device:
        raise ValueError(f"visual_embeds must be on the device of text_embeds ({device}), got {visual_embeds.device}")

    # Positions: int64, (rows,) or (3, rows), the same rank for text and visual, on the embeds' device.
    for name, pos, rows_name, rows in (
        ("text_positions", text_positions, "text_embeds", text_embeds.shape[0]),
        ("visual_positions", visual_positions, "visual_embeds", visual_embeds.shape[0]),
    ):
        if pos.dtype != torch.int64:
            raise TypeError(f"{name} must be int64, got {pos.dtype}")
        if pos.dim() not in (1, 2) or (pos.dim() == 2 and pos.shape[0] != 3):
            raise ValueError(f"{name} must have shape ({rows},) or (3, {rows}) (M-RoPE), got {tuple(pos.shape)}")
        if pos.shape[-1] != rows:
            raise ValueError(
                f"{name} must have one column per row of {rows_name} ({rows}), got shape {tuple(pos.shape)}"
            )
        if pos.device != device:
            raise ValueError(f"{name} must be on the device of text_embeds ({device}), got {pos.device}")
    if visual_positions.dim() != text_positions.dim():
        raise ValueError(
            f"visual_positions must have the rank of text_positions ({text_positions.dim()}-D, shape "
            f"{tuple(text_positions.shape)}), got shape {tuple(visual_positions.shape)}"
        )

    # Index tensors: 1-D int32/int64, on the CPU or on the embeds' device.
    index_names = ("text_cu_seqlens", "visual_cu_seqlens", "image_request", "image_insert_at")
    index_values = (text_cu_seqlens, visual_cu_seqlens, image_request, image_insert_at)
    for name, t in zip(index_names, index_values):
        if t.dtype not in _INDEX_DTYPES:
            raise TypeError(f"{name} must be int32 or int64, got {t.dtype}")
        if t.dim() != 1:
            raise ValueError(f"{name} must be 1-D, got shape {tuple(t.shape)}")
        if t.device.type != "cpu" and t.device != device:
            raise ValueError(f"{name} must be on the CPU or on the device of text_embeds ({device}), got {t.device}")

    # One device-to-host copy for all index tensors that are not on the CPU yet.
    on_device = [k for k, t in enumerate(index_values) if t.device.type != "cpu"]
    host = [t.to(torch.int64).contiguous() if t.device.type == "cpu" else None for t in index_values]
    if on_device:
        flat = torch.cat([index_values[k].to(torch.int64) for k in on_device]).cpu()
        for k, part in zip(on_device, flat.split([index_values[k].numel() for k in on_device])):
            host[k] = part.contiguous()
    text_cu, visual_cu, req, ins = (t.tolist() for t in host)

    _check_offsets("text_cu_seqlens", text_cu, text_embeds.shape[0], "text_embeds", min_len=2)
    _check_offsets("visual_cu_seqlens", visual_cu, visual_embeds.shape[0], "visual_embeds", min_len=1)
    num_requests, num_images = len(text_cu) - 1, len(visual_cu) - 1
    for name, seq in (("image_request", req), ("image_insert_at", ins)):
        if len(seq) != num_images:
            raise ValueError(
                f"{name} must have one entry per image (visual_cu_seqlens has {num_images} images), got {len(seq)}"
            )

    image_rows_per_request = [0] * num_requests
    for i, (r, at) in enumerate(zip(req, ins)):
        if not 0 <= r < num_requests:
            raise ValueError(f"image_request[{i}] must be a request index in [0, {num_requests}), got {r}")
        if i > 0 and r < req[i - 1]:
            raise ValueError(
                f"image_request must be non-decreasing (images grouped by request, in order), got "
                f"image_request[{i - 1}] = {req[i - 1]} > image_request[{i}] = {r}"
            )
        text_len = text_cu[r + 1] - text_cu[r]
        if not 0 <= at <= text_len:
            raise ValueError(
                f"image_insert_at[{i}] must be in [0, {text_len}] (text tokens of request {r}), got {at}"
            )
        if i > 0 and r == req[i - 1] and at < ins[i - 1]:
            raise ValueError(
                f"image_insert_at must be non-decreasing within a request, got image_insert_at[{i - 1}] = "
                f"{ins[i - 1]} > image_insert_at[{i}] = {at} (both images of request {r})"
            )
        image_rows_per_request[r] += visual_cu[i + 1] - visual_cu[i]

    for r in range(num_requests):
        if text_cu[r + 1] - text_cu[r] + image_rows_per_request[r] == 0:
            raise ValueError(
                f"request {r} has no tokens (text_cu_seqlens[{r}] = text_cu_seqlens[{r + 1}] = {text_cu[r]} "
                f"and no kept visual tokens); every request needs at least one token"
            )
    total = text_embeds.shape[0] + visual_embeds.shape[0]
    if total > _INT32_MAX:
        raise ValueError(f"the batch packs to {total} tokens; int32 cu_seqlens allow at most {_INT32_MAX}")

    return _Index(*host, text_cu, visual_cu, req, ins)


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------


def pack_varlen(
    text_embeds: Tensor,
    text_cu_seqlens: Tensor,
    text_positions: Tensor,
    visual_embeds: Tensor,
    visual_cu_seqlens: Tensor,
    visual_positions: Tensor,
    image_request: Tensor,
    image_insert_at: Tensor,
) -> PackedBatch:
    """Pack every request's text and kept visual tokens, in sequence order, into one varlen batch.

    Args:
        text_embeds: (Lt, H), all requests' text tokens, request after request.
        text_cu_seqlens: (B+1,) int32/int64 offsets of each request's text in ``text_embeds``.
        text_positions: (Lt,) or (3, Lt) int64 full-sequence position ids of the text tokens.
        visual_embeds: (Kt, H), all images' kept tokens, image after image; (0, H) without images.
        visual_cu_seqlens: (I+1,) int32/int64 offsets of each image's kept tokens.
        visual_positions: (Kt,) or (3, Kt) int64 positions of the kept tokens (rank of text_positions).
        image_request: (I,) int request of each image, non-decreasing.
        image_insert_at: (I,) int number of its request's text tokens before each image,
            non-decreasing within a request.

    Index tensors may be on the CPU (no synchronisation) or on the embeddings' device (one
    device-to-host copy). Embeddings of any dtype are copied bit-exactly.

    Raises:
        TypeError / ValueError: bad arguments; the message names the argument.
        ImportError: the extension is not built.
        RuntimeError: CUDA inputs with an extension built without its CUDA path.
    """
    ext = _extension()
    index = _check_args(
        text_embeds, text_cu_seqlens, text_positions, visual_embeds, visual_cu_seqlens,
        visual_positions, image_request, image_insert_at,
    )
    device = text_embeds.device
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"text_embeds must be on a cpu or cuda device for pack_varlen, got {device}")
    if device.type == "cuda" and not ext.built_with_cuda():
        raise RuntimeError(
            "autoselect_fast._C was built without its CUDA path (CPU-only torch at build time, no nvcc, "
            "or AUTOSELECT_FAST_SKIP_CUDA=1); rebuild on a CUDA build of torch with "
            "`pip install --no-build-isolation -e .` (AUTOSELECT_FAST_FORCE_CUDA=1 makes that build fail loudly)"
        )
    embeds, cu_seqlens, max_seqlen, position_ids, last = ext.pack_varlen(
        text_embeds, text_positions, visual_embeds, visual_positions,
        index.text_cu, index.visual_cu, index.image_request, index.image_insert_at,
    )
    return PackedBatch(embeds, cu_seqlens, int(max_seqlen), position_ids, last)


def pack_varlen_reference(
    text_embeds: Tensor,
    text_cu_seqlens: Tensor,
    text_positions: Tensor,
    visual_embeds: Tensor,
    visual_cu_seqlens: Tensor,
    visual_positions: Tensor,
    image_request: Tensor,
    image_insert_at: Tensor,
) -> PackedBatch:
    """Plain PyTorch packing: the spec :func:`pack_varlen` is tested against. Same arguments."""
    index = _check_args(
        text_embeds, text_cu_seqlens, text_positions, visual_embeds, visual_cu_seqlens,
        visual_positions, image_request, image_insert_at,
    )
    text_cu, visual_cu = index.text_cu_list, index.visual_cu_list
    num_requests = len(text_cu) - 1

    sequences, positions, lengths = [], [], []
    for r in range(num_requests):
        text = text_embeds[text_cu[r] : text_cu[r + 1]]
        text_pos = text_positions[..., text_cu[r] : text_cu[r + 1]]
        pieces, pos_pieces = [], []
        emitted = 0  # text tokens of request r already placed
        for i, (owner, insert_at) in enumerate(zip(index.image_request_list, index.image_insert_at_list)):
            if owner != r:
                continue
            pieces.append(text[emitted:insert_at])
            pos_pieces.append(text_pos[..., emitted:insert_at])
            pieces.append(visual_embeds[visual_cu[i] : visual_cu[i + 1]])
            pos_pieces.append(visual_positions[..., visual_cu[i] : visual_cu[i + 1]])
            emitted = insert_at
        pieces.append(text[emitted:])
        pos_pieces.append(text_pos[..., emitted:])
        sequences.append(torch.cat(pieces, dim=0))
        positions.append(torch.cat(pos_pieces, dim=-1))
        lengths.append(sequences[-1].shape[0])

    device = text_embeds.device
    cu_seqlens = torch.zeros(num_requests + 1, dtype=torch.int32, device=device)
    cu_seqlens[1:] = torch.tensor(lengths, dtype=torch.int32).cumsum(0).to(device)
    return PackedBatch(
        embeds=torch.cat(sequences, dim=0),
        cu_seqlens=cu_seqlens,
        max_seqlen=max(lengths),
        position_ids=torch.cat(positions, dim=-1),
        last_token_index=cu_seqlens[1:].to(torch.int64) - 1,
    )
