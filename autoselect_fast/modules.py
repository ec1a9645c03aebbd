"""The two trained modules of AutoSelect: the ``Scorer`` and the train-only ``Denoiser``.

Both sit on the vision features before the projector (width ``d_v``) and are saved as a safetensors
file plus a JSON config (``save_pretrained`` / ``from_pretrained``).

* ``Scorer``: optional input projection d_v -> d, L pre-norm transformer encoder blocks with full
  attention among one image's own tokens, final LayerNorm, Linear(d -> 1). No positional encoding:
  the vision features already carry position, and the Scorer is permutation-equivariant over tokens.
* ``Denoiser``: one pre-norm transformer block whose attention mask is the identity. With one key per
  query the softmax weight is exactly 1, so the attention of token i is ``W_o W_v LN(x_i)``; it is
  computed in that closed form, which is the same function and makes it plain that no information
  crosses tokens.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from typing import Optional

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .ragged import lengths_from_cu_seqlens, packed_to_padded
from .validation import check_cu_seqlens, check_tensor, resolve_validate

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


@dataclass
class ScorerConfig:
    input_dim: int = 1024  # d_v: width of the vision features it reads
    hidden_dim: int = 1024
    num_layers: int = 2
    num_heads: int = 16
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        for name in ("input_dim", "hidden_dim", "num_layers", "num_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ScorerConfig.{name} must be an int >= 1, got {value!r}")
        if self.hidden_dim % self.num_heads:
            raise ValueError(f"ScorerConfig.hidden_dim ({self.hidden_dim}) must be divisible by num_heads ({self.num_heads})")
        if self.mlp_ratio <= 0:
            raise ValueError(f"ScorerConfig.mlp_ratio must be > 0, got {self.mlp_ratio}")


@dataclass
class DenoiserConfig:
    input_dim: int = 1024  # d_v: it maps gated vision features back to what the projector expects
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        if not isinstance(self.input_dim, int) or self.input_dim < 1:
            raise ValueError(f"DenoiserConfig.input_dim must be an int >= 1, got {self.input_dim!r}")
        if self.mlp_ratio <= 0:
            raise ValueError(f"DenoiserConfig.mlp_ratio must be > 0, got {self.mlp_ratio}")


class _MLP(nn.Sequential):
    def __init__(self, dim: int, ratio: float):
        hidden = int(dim * ratio)
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))


class EncoderBlock(nn.Module):
    """Pre-norm transformer block: x + Attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, norm_eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = _MLP(dim, mlp_ratio)

    def forward(self, x: Tensor, key_mask: Optional[Tensor] = None) -> Tensor:
        """``x`` (B, N, d); ``key_mask`` (B, N) bool, True for real tokens (padding is never attended)."""
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        mask = None if key_mask is None else key_mask[:, None, None, :]
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + self.proj(attn.transpose(1, 2).reshape(b, n, d))
        return x + self.mlp(self.norm2(x))


class _Checkpointable(nn.Module):
    """safetensors + JSON config persistence shared by Scorer and Denoiser."""

    config_class: type
    kind: str

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, CONFIG_NAME), "w") as fh:
            json.dump({"kind": self.kind, **asdict(self.config)}, fh, indent=2)
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, os.path.join(directory, WEIGHTS_NAME))

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, *, expected_input_dim: Optional[int] = None, map_location="cpu"):
        """Load a checkpoint; ``expected_input_dim`` is the d_v of the model it will be attached to."""
        config_path = os.path.join(directory, CONFIG_NAME)
        if not os.path.isfile(config_path):
            raise FileNotFoundError(f"no {CONFIG_NAME} in {directory!s}: not a {cls.__name__} checkpoint")
        with open(config_path) as fh:
            raw = json.load(fh)
        kind = raw.pop("kind", None)
        if kind != cls.kind:
            raise ValueError(f"checkpoint at {directory!s} holds a {kind!r}, expected a {cls.kind!r}")
        known = {f.name for f in fields(cls.config_class)}
        module = cls(cls.config_class(**{k: v for k, v in raw.items() if k in known}))
        if expected_input_dim is not None:
            module.check_input_dim(expected_input_dim)
        module.load_state_dict(load_file(os.path.join(directory, WEIGHTS_NAME), device=str(map_location)))
        return module

    def check_input_dim(self, vision_dim: int) -> None:
        """Raise if this module cannot read vision features of width ``vision_dim``."""
        if vision_dim != self.config.input_dim:
            raise ValueError(
                f"{type(self).__name__} reads vision features of width input_dim={self.config.input_dim}, "
                f"but the model's vision features have width {vision_dim}"
            )


class Scorer(_Checkpointable):
    """Gives every visual token a scalar score; images attend only to their own tokens."""

    config_class = ScorerConfig
    kind = "scorer"

    def __init__(self, config: ScorerConfig = ScorerConfig()):
        super().__init__()
        self.config = config
        d = config.hidden_dim
        self.input_proj = nn.Linear(config.input_dim, d) if config.input_dim != d else nn.Identity()
        self.blocks = nn.ModuleList(EncoderBlock(d, config.num_heads, config.mlp_ratio, config.norm_eps) for _ in range(config.num_layers))
        self.norm = nn.LayerNorm(d, eps=config.norm_eps)
        self.head = nn.Linear(d, 1)

    def forward(self, features: Tensor, cu_seqlens: Optional[Tensor] = None) -> Tensor:
        """Scores of every token.

        ``features`` is flat ``(ΣN, d_v)`` with ``cu_seqlens`` ``(B+1,)`` (``None``: one image), or a
        batch ``(B, N, d_v)`` of equally sized images. Returns ``(ΣN,)`` or ``(B, N)``.
        """
        check_tensor("features", features, ndim=(2, 3))
        self.check_input_dim(features.shape[-1])
        if features.dim() == 3:
            return self._score_padded(features, None)
        # The offsets' values are checked on the host only where that costs no synchronisation (CPU, tests),
        # as in ``ops`` (``AUTOSELECT_FAST_VALIDATE``): on CUDA a read would stall every Scorer call.
        validate = resolve_validate(None, features.device)
        cu = check_cu_seqlens(cu_seqlens, features.shape[0], device=features.device, validate=validate)
        if cu.numel() == 2:  # one image: no padding needed
            return self._score_padded(features[None], None)[0]
        lengths = lengths_from_cu_seqlens(cu)
        padded = packed_to_padded(features, cu)
        key_mask = torch.arange(padded.shape[1], device=features.device)[None, :] < lengths[:, None]
        return self._score_padded(padded, key_mask)[key_mask]

    def _score_padded(self, x: Tensor, key_mask: Optional[Tensor]) -> Tensor:
        x = self.input_proj(x)
        for block in self.blocks:
            x = block(x, key_mask)
        return self.head(self.norm(x)).squeeze(-1)


class Denoiser(_Checkpointable):
    """Per-token pre-norm block (identity attention mask) mapping gated features back towards X."""

    config_class = DenoiserConfig
    kind = "denoiser"

    def __init__(self, config: DenoiserConfig = DenoiserConfig()):
        super().__init__()
        self.config = config
        d = config.input_dim
        self.norm1 = nn.LayerNorm(d, eps=config.norm_eps)
        self.value = nn.Linear(d, d)
        self.proj = nn.Linear(d, d)
        self.norm2 = nn.LayerNorm(d, eps=config.norm_eps)
        self.mlp = _MLP(d, config.mlp_ratio)

    def forward(self, x: Tensor) -> Tensor:
        """``x`` ``(..., d_v)``; every token is transformed on its own."""
        check_tensor("x", x)
        self.check_input_dim(x.shape[-1])
        # Identity-masked attention: each query's only key is itself, so its softmax weight is 1 and
        # the output is the token's own value vector.
        x = x + self.proj(self.value(self.norm1(x)))
        return x + self.mlp(self.norm2(x))
