"""``autoselect-fast train``: train a Scorer (+ Denoiser) on a frozen VLM from a local folder.

Settings come from ``--config file.json`` (keys = ``TrainConfig`` fields) and/or flags (flags win).
Multi-GPU / multi-process: ``torchrun --nproc_per_node N -m autoselect_fast train ...``. The model,
data and settings are all checked before the first step.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import fields

import torch

from .config import TrainConfig

_HELP = {
    "model": "local folder of the VLM (transformers save_pretrained layout, tokenizer with a chat template)",
    "data": "JSONL of LLaVA-style conversation records",
    "keep": "visual tokens kept per image (K)",
    "keep_ratio": "alternatively K = max(1, round(keep_ratio * N)) per image",
    "batch_size": "samples per optimiser step over all processes and accumulation steps",
    "gate": "vp (default) or scale (ablation: x*alpha)",
    "denoiser_attention": "identity (default) or global (ablation)",
    "resume": "continue the run in --output-dir from its checkpoint",
    "bf16": "bf16 autocast on CUDA (default on; ignored on a CPU)",
    "progress": "show a progress bar (default on)",
    "strict_data": "stop at the first malformed record or unreadable image instead of reporting and skipping it",
}


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="JSON file of settings (TrainConfig fields); flags override it")
    for f in fields(TrainConfig):
        if f.name == "extra":
            continue
        flag = "--" + f.name.replace("_", "-")
        default = TrainConfig().__getattribute__(f.name)
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=_HELP.get(f.name, f"default {default!r}"))
        else:
            kind = {"keep": int, "tau_steps": int, "keep_ratio": float}.get(f.name, type(default) if default is not None else str)
            parser.add_argument(flag, type=kind, default=None, help=_HELP.get(f.name, f"default {default!r}"))


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    values = TrainConfig.from_json(args.config).to_dict() if args.config else {}
    for f in fields(TrainConfig):
        given = getattr(args, f.name, None)
        if given is not None:
            values[f.name] = given
    config = TrainConfig.from_dict(values).validate()
    for name in ("model", "data"):
        if getattr(config, name) is None:
            raise ValueError(f"{name} is required (flag --{name} or the config file)")
    return config


def load_model(path: str, device: torch.device):
    """The VLM in ``path``; ValueError naming the class when it is not one the adapters support."""
    import transformers

    from ..models import supported_model_classes

    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise ValueError(f"model={path!r} is not a model folder (no config.json)")
    with open(config_path) as fh:
        architectures = json.load(fh).get("architectures") or []
    supported = supported_model_classes()
    arch = next((a for a in architectures if a in supported), None)
    if arch is None:
        raise ValueError(f"model {path!r} is a {architectures or 'model without architectures'}; supported model classes: {supported}")
    return getattr(transformers, arch).from_pretrained(path).to(device)


def _device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    return torch.device(name)


def run_train_command(args: argparse.Namespace) -> dict:
    from transformers import AutoTokenizer

    from ..models import get_adapter
    from .data import ConversationDataset
    from .trainer import Trainer, build_objective

    try:  # set-up errors (settings, model, data) are one-line messages, not tracebacks
        config = config_from_args(args)
        device = _device(config.device)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        torch.manual_seed(config.seed)
        model = load_model(config.model, device)
        adapter = get_adapter(model)
        tokenizer = AutoTokenizer.from_pretrained(config.model)
        try:
            from transformers import AutoImageProcessor

            image_processor = AutoImageProcessor.from_pretrained(config.model)
        except (OSError, ValueError):
            image_processor = None  # no preprocessor_config.json: the adapter's default for this model
        objective = build_objective(model, config)
        dataset = ConversationDataset(config.data, adapter, tokenizer, image_folder=config.image_folder,
                                      image_processor=image_processor, strict=config.strict_data)
        trainer = Trainer(objective, dataset, config)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        print(f"autoselect-fast train: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    metrics = trainer.train()
    if trainer.is_main:
        print(f"trained {trainer.step} steps: final loss {metrics.get('loss', float('nan')):.4f}; "
              f"Scorer saved to {os.path.join(config.output_dir, 'scorer')}")
    return metrics
