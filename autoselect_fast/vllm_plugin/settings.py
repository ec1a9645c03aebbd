"""The plugin's settings and every check made before vLLM starts its engine.

A model opts in with ``hf_overrides`` keys ``autoselect_*`` (:class:`PluginSettings`). All of them, the
Scorer checkpoint and the vLLM options the plugin cannot serve with are checked by one function,
:func:`check_vllm_config`. vLLM calls it through :class:`ConfigCheck` while it builds its configuration in
the user's process (``LLM(...)`` or the server's start), before any engine process exists, so a bad setting
stops there with :class:`SettingError` as the last line of the traceback. The model's constructor calls
it again in the worker.

This module does not import vLLM at import time (the package must import without it).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Optional

from ..budget import check_budget_args, image_budget
from ..reference import POSITION_MODES
from .version import ARCHITECTURE, WORKER_EXTENSION, check_vllm_version

PREFIX = "autoselect_"  # hf_overrides keys of this plugin
MESSAGE_PREFIX = "autoselect_fast: "  # every error of the plugin starts with it: grep a vLLM log for it
_KNOWN = ("scorer", "keep", "keep_ratio", "position_mode")


class SettingError(Exception):
    """A setting the plugin cannot serve with. Its first line reads ``autoselect_fast: <setting>=<value as
    given>: <what is wrong and what is allowed>``.

    Deliberately not a ValueError: vLLM builds its configuration as a pydantic dataclass, which would wrap
    a ValueError raised there into "1 validation error for VllmConfig"; other exceptions reach the user as
    they are.
    """


def _shown(value: Any) -> str:
    """A setting's value as the user wrote it in hf_overrides (JSON on the command line): 0 stays 0."""
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


def setting_error(setting: str, value: Any, problem: str) -> SettingError:
    return SettingError(f"{MESSAGE_PREFIX}{setting}={_shown(value)}: {problem}")


@dataclass(frozen=True)
class PluginSettings:
    """The plugin's configuration, from the model's HF config (``hf_overrides`` keys ``autoselect_*``).

    * ``autoselect_scorer``: directory of a ``Scorer.save_pretrained`` checkpoint (required);
    * ``autoselect_keep`` (K per image, clipped to N_i) or ``autoselect_keep_ratio`` (0 < r <= 1):
      exactly one;
    * ``autoselect_position_mode``: ``"original"`` (default) or ``"compact"``.
    """

    scorer: str
    keep: Optional[int]
    keep_ratio: Optional[float]
    position_mode: str

    @classmethod
    def from_config(cls, hf_config) -> "PluginSettings":
        given = {k: v for k, v in vars(hf_config).items() if k.startswith(PREFIX)}
        unknown = sorted(k for k in given if k[len(PREFIX):] not in _KNOWN)
        if unknown:
            named = ", ".join(f"{k}={_shown(given[k])}" for k in unknown)
            known = ", ".join(PREFIX + k for k in sorted(_KNOWN))
            raise SettingError(f"{MESSAGE_PREFIX}{named}: unknown setting{'s' if len(unknown) > 1 else ''}; known: {known}")
        scorer = given.get(PREFIX + "scorer")
        if scorer is None:
            raise SettingError(f"{MESSAGE_PREFIX}{PREFIX}scorer is missing: hf_overrides must give the directory of a "
                               "Scorer checkpoint (Scorer.save_pretrained)")
        if not isinstance(scorer, (str, os.PathLike)) or not os.path.isdir(scorer):
            raise setting_error(PREFIX + "scorer", scorer, "not a directory (expected a Scorer.save_pretrained checkpoint)")
        keep, keep_ratio = given.get(PREFIX + "keep"), given.get(PREFIX + "keep_ratio")
        try:
            check_budget_args(keep, keep_ratio, required=True)
        except ValueError as exc:
            if keep is None and keep_ratio is None:
                raise SettingError(f"{MESSAGE_PREFIX}{PREFIX}keep and {PREFIX}keep_ratio are both missing: {exc}") from None
            if keep is not None and keep_ratio is not None:
                raise SettingError(f"{MESSAGE_PREFIX}{PREFIX}keep={_shown(keep)} and {PREFIX}keep_ratio={_shown(keep_ratio)}: "
                                   f"{exc}") from None
            name, value = ("keep", keep) if keep is not None else ("keep_ratio", keep_ratio)
            raise setting_error(PREFIX + name, value, str(exc)) from None
        mode = given.get(PREFIX + "position_mode", "original")
        if mode not in POSITION_MODES:
            raise setting_error(PREFIX + "position_mode", mode, f"must be one of {', '.join(map(_shown, POSITION_MODES))}")
        return cls(scorer=str(scorer), keep=keep, keep_ratio=None if keep_ratio is None else float(keep_ratio), position_mode=mode)

    def budget(self, num_tokens: int) -> int:
        """K_i of an image of N_i = ``num_tokens`` merged tokens (the engine's rule, clipped to N_i)."""
        return image_budget(num_tokens, self.keep, self.keep_ratio, clip=True)


def check_vllm_config(vllm_config):
    """Every check made before serving, in vLLM's ``VllmConfig``: the settings, the vLLM options the plugin
    cannot serve with, and the Scorer checkpoint against the model. Returns ``(PluginSettings, Scorer)``."""
    from ..modules import Scorer

    config = vllm_config.model_config.hf_config
    settings = PluginSettings.from_config(config)
    model_type = getattr(config, "model_type", None)
    if model_type != "qwen2_5_vl":
        raise setting_error("model_type", model_type, f"{ARCHITECTURE} needs a Qwen2.5-VL checkpoint (model_type \"qwen2_5_vl\")")
    mm_config = vllm_config.model_config.get_multimodal_config()
    if mm_config.is_multimodal_pruning_enabled():
        raise setting_error("video_pruning_rate", mm_config.video_pruning_rate,
                            "vLLM's video pruning cannot be combined with this plugin; leave it at 0")
    if mm_config.mm_encoder_tp_mode == "data":
        raise setting_error("mm_encoder_tp_mode", mm_config.mm_encoder_tp_mode,
                            "data-parallel vision encoding is not supported; use the default \"weights\"")
    if getattr(vllm_config.compilation_config, "cudagraph_mm_encoder", False):
        raise setting_error("cudagraph_mm_encoder", True, "the encoder CUDA graph runs the vision tower outside the plugin; switch it off")
    pipeline = vllm_config.parallel_config.pipeline_parallel_size
    if pipeline > 1:
        raise setting_error("pipeline_parallel_size", pipeline,
                            "pipeline parallelism is not supported (every stage would run the vision tower); use tensor parallelism")
    if vllm_config.lora_config is not None and getattr(vllm_config.lora_config, "enable_tower_connector_lora", False):
        raise setting_error("enable_tower_connector_lora", True,
                            "LoRA on the tower is not supported: the tower runs when a request is added, outside vLLM's LoRA mapping")
    for name in ("kv_transfer_config", "ec_transfer_config"):
        if getattr(vllm_config, name, None) is not None:
            raise SettingError(f"{MESSAGE_PREFIX}{name} is set: disaggregated serving is not supported (images would arrive "
                               "without the selection made on the other instance)")
    vision = config.vision_config
    unit = vision.spatial_merge_size**2
    try:
        scorer = Scorer.from_pretrained(settings.scorer)
    except Exception as exc:  # not a Scorer checkpoint, unreadable weights, ...
        raise setting_error(PREFIX + "scorer", settings.scorer, f"cannot load a Scorer from it: {exc}") from exc
    try:
        scorer.check_input_dim(unit * vision.hidden_size)
    except ValueError as exc:
        raise setting_error(PREFIX + "scorer", settings.scorer, f"the Scorer does not fit this model: {exc} "
                            f"(merge² x vision hidden = {unit} x {vision.hidden_size})") from None
    return settings, scorer


class ConfigCheck:
    """vLLM's per-architecture configuration hook (``vllm.model_executor.models.config.MODELS_CONFIG_MAP``),
    registered for ``AutoSelectQwen2_5_VL`` by :func:`autoselect_fast.vllm_plugin.register`. vLLM calls it
    in the process that builds the configuration, before it starts the engine."""

    @staticmethod
    def verify_and_update_config(vllm_config) -> None:
        import vllm
        from vllm.logger import init_logger

        check_vllm_version(vllm.__version__)
        check_vllm_config(vllm_config)
        # The workers get the method autoselect_counts, so llm.collective_rpc("autoselect_counts") reads the
        # counters whether or not the engine runs in its own process (a lambda for apply_model cannot be sent).
        parallel = vllm_config.parallel_config
        if not parallel.worker_extension_cls:
            parallel.worker_extension_cls = WORKER_EXTENSION
        elif parallel.worker_extension_cls != WORKER_EXTENSION:
            init_logger(__name__).warning(
                "%sworker_extension_cls=%s is set, so collective_rpc(\"autoselect_counts\") is not available; "
                "the plugin works as usual", MESSAGE_PREFIX, parallel.worker_extension_cls)

    @staticmethod
    def verify_and_update_model_config(model_config) -> None:
        return
