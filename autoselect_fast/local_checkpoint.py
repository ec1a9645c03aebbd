"""Local checkpoints for the ``generate`` and ``show`` commands: check everything, then load.

This module owns opening what a user has on disk: a transformers VLM checkpoint directory (config,
weights, processor with tokenizer and chat template), a Scorer checkpoint (``Scorer.save_pretrained``)
and an image file. :func:`open_checkpoint` reads only the small files and builds the model as a
skeleton on the ``meta`` device, so the architecture, the Scorer's width, the image and the budget K
are all checked (:class:`~autoselect_fast.preflight.UsageError`, one line naming the argument)
before a single weight is read; :meth:`LocalCheckpoint.load_model` then loads the weights.

The model class comes from ``config.architectures`` and must be one the adapters in
``autoselect_fast.models`` support, so a new model family works here as soon as its adapter exists.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Optional

import torch

from .budget import image_budget
from .models import VLMAdapter, get_adapter, supported_model_classes
from .modules import CONFIG_NAME, Scorer
from .preflight import UsageError, check_budgets, meta_model, visual_tokens_of_image
from .progress import heartbeat


@dataclass
class LocalCheckpoint:
    """A checked model directory: config, model class, processor and an adapter on a weightless skeleton."""

    path: str
    config: Any
    model_class: type
    processor: Any
    skeleton_adapter: VLMAdapter

    @property
    def image_processor(self):
        return self.processor.image_processor

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def image_token(self) -> str:
        token = getattr(self.processor, "image_token", None)
        return token if token is not None else self.tokenizer.convert_ids_to_tokens(self.skeleton_adapter.image_token_id)

    def visual_tokens(self, image) -> int:
        """N of ``image`` for this model (host-side image processing only)."""
        return visual_tokens_of_image(self.skeleton_adapter, image, self.image_processor)

    def chat_prompt(self, question: str) -> str:
        """The prompt text with the image placeholder, through the processor's chat template.

        A ``question`` that already holds the image token places the image itself; a checkpoint without
        a chat template gets ``"<image>\\n" + question``.
        """
        has_image = self.image_token in question
        if question.count(self.image_token) > 1:
            raise UsageError(f"--prompt holds the image token {self.image_token!r} {question.count(self.image_token)} times; one image takes one placeholder")
        if getattr(self.processor, "chat_template", None):
            content = ([] if has_image else [{"type": "image"}]) + [{"type": "text", "text": question}]
            return self.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        return question if has_image else f"{self.image_token}\n{question}"

    def load_model(self, device: torch.device, dtype: torch.dtype, *, progress: bool = True):
        with heartbeat(f"loading {self.model_class.__name__} from {self.path} ({dtype}, {device})", enabled=progress):
            model = self.model_class.from_pretrained(self.path, dtype=dtype)
            model = model.to(device).eval()
        return model


@dataclass
class ImageTextProcessor:
    """The two parts of a multimodal processor that still images need: the saved image processor and the
    tokenizer (with its chat template). Used when the model's full processor cannot be built because a
    part images never use is missing a library (Qwen2.5-VL's video processor needs torchvision)."""

    image_processor: Any
    tokenizer: Any

    @property
    def chat_template(self) -> Optional[str]:
        return getattr(self.tokenizer, "chat_template", None)

    def apply_chat_template(self, messages, **kwargs) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)


def _images_and_text_processor(path: str, missing: ImportError) -> ImageTextProcessor:
    from transformers import AutoImageProcessor, AutoTokenizer

    try:
        return ImageTextProcessor(AutoImageProcessor.from_pretrained(path, local_files_only=True),
                                  AutoTokenizer.from_pretrained(path, local_files_only=True))
    except Exception as exc:  # noqa: BLE001
        raise ValueError(f"the saved processor needs a missing library ({missing}) and its image processor and tokenizer "
                         f"alone cannot be loaded either: {exc}") from None


def _check_dir(flag: str, path: str, what: str) -> None:
    if not os.path.exists(path):
        raise UsageError(f"{flag} {path}: no such directory ({what})")
    if not os.path.isdir(path):
        raise UsageError(f"{flag} {path}: not a directory ({what})")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise UsageError(f"{flag} {path}: no config.json in it, so it is not a {what}")


def open_checkpoint(path: str) -> LocalCheckpoint:
    """Check ``--model DIR`` and build its weightless skeleton; UsageError naming what is wrong."""
    import transformers
    from transformers import AutoConfig, AutoProcessor

    _check_dir("--model", path, "saved transformers model directory (save_pretrained)")
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable config is the user's input
        raise UsageError(f"--model {path}: config.json cannot be read by transformers: {exc}") from None
    supported = supported_model_classes()
    architectures = list(getattr(config, "architectures", None) or [])
    names = [a for a in architectures if a in supported]
    if not names:
        raise UsageError(f"--model {path}: architecture {architectures or 'not given in config.json'} is not supported; supported: {', '.join(supported)}")
    model_class = getattr(transformers, names[0])
    try:
        try:
            processor = AutoProcessor.from_pretrained(path, local_files_only=True)
        except ImportError as missing:  # e.g. Qwen2.5-VL's processor also builds a video processor, which needs torchvision
            processor = _images_and_text_processor(path, missing)
    except Exception as exc:  # noqa: BLE001
        raise UsageError(f"--model {path}: no usable processor saved with the model (processor_config.json, tokenizer files): {exc}") from None
    if not hasattr(processor, "image_processor") or not hasattr(processor, "tokenizer"):
        raise UsageError(f"--model {path}: the saved processor ({type(processor).__name__}) has no image processor and tokenizer; save the model's multimodal processor with it")
    adapter = get_adapter(meta_model(model_class, config))
    return LocalCheckpoint(path, config, model_class, processor, adapter)


def load_scorer(path: str, feature_dim: int, model_path: str) -> Scorer:
    """``--scorer DIR`` as a Scorer that reads features of width ``feature_dim``."""
    _check_dir("--scorer", path, "Scorer checkpoint (Scorer.save_pretrained)")
    try:
        with open(os.path.join(path, CONFIG_NAME)) as fh:
            raw = json.load(fh)
    except (OSError, json.JSONDecodeError) as exc:
        raise UsageError(f"--scorer {path}: config.json is not readable JSON: {exc}") from None
    if raw.get("input_dim") is not None and raw.get("input_dim") != feature_dim:
        raise UsageError(
            f"--scorer {path} reads vision features of width input_dim={raw.get('input_dim')}, but --model {model_path} "
            f"gives features of width {feature_dim}; train or pick a Scorer for this model"
        )
    try:
        return Scorer.from_pretrained(path, expected_input_dim=feature_dim).eval()
    except (ValueError, TypeError, OSError, RuntimeError) as exc:
        raise UsageError(f"--scorer {path}: {exc}") from None


def load_image(path: str):
    """``--image FILE`` as an RGB Pillow image (fully decoded, so a broken file fails here)."""
    from PIL import Image, UnidentifiedImageError

    if not os.path.isfile(path):
        raise UsageError(f"--image {path}: no such file")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise UsageError(f"--image {path}: not a readable image ({exc})") from None


def resolve_budget(num_tokens: int, keep: Optional[int], keep_ratio: Optional[float]) -> Optional[int]:
    """K for an image of N tokens from ``--keep`` / ``--keep-ratio`` (checked against N), None for neither."""
    if keep is not None:
        check_budgets([keep], num_tokens, what="this image", allow_all=True)
        return keep
    if keep_ratio is not None:
        return image_budget(num_tokens, keep_ratio=keep_ratio)
    return None


@dataclass
class CheckedInputs:
    """What ``generate`` and ``show`` read from their flags, checked before any weights load."""

    checkpoint: LocalCheckpoint
    scorer: Scorer
    image: Any  # RGB Pillow image
    num_tokens: int  # N of the image for this model
    keep: Optional[int]  # K, or None to keep every token


def check_inputs(model: str, scorer: str, image: str, keep: Optional[int], keep_ratio: Optional[float]) -> CheckedInputs:
    """``--model``, ``--scorer``, ``--image`` and the budget, each a one-line ``UsageError`` when wrong."""
    checkpoint = open_checkpoint(model)
    loaded_scorer = load_scorer(scorer, checkpoint.skeleton_adapter.feature_dim, model)
    picture = load_image(image)
    num_tokens = checkpoint.visual_tokens(picture)
    return CheckedInputs(checkpoint, loaded_scorer, picture, num_tokens, resolve_budget(num_tokens, keep, keep_ratio))
