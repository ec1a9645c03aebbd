"""vLLM plugin: Qwen2.5-VL serving that prefills K_i of the N_i visual tokens of each image, picked by
a trained AutoSelect Scorer before the merger.

Installing ``autoselect_fast`` registers this plugin with vLLM (entry point group
``vllm.general_plugins``, see ``setup.py``). :func:`register` runs in every vLLM process and adds one
model architecture, ``AutoSelectQwen2_5_VL``. Nothing changes for a deployment that does not ask for it:
vLLM's own Qwen2.5-VL stays the default, and a model opts in through ``hf_overrides``::

    from vllm import LLM
    llm = LLM(model="Qwen/Qwen2.5-VL-7B-Instruct", hf_overrides={
        "architectures": ["AutoSelectQwen2_5_VL"],
        "autoselect_scorer": "/path/to/scorer",      # Scorer.save_pretrained directory
        "autoselect_keep_ratio": 0.222,               # or "autoselect_keep": 64 (K per image, clipped to N_i)
    })

The settings and the checks made before vLLM starts its engine are in
:mod:`autoselect_fast.vllm_plugin.settings`; the model code is in
:mod:`autoselect_fast.vllm_plugin.qwen2_5_vl`, which imports vLLM. This module does not (importing
``autoselect_fast`` never needs vLLM). Supported vLLM versions: :data:`SUPPORTED_VLLM` (the plugin builds
on private vLLM classes that change between releases).

The plugin's counters (images selected, sent without pixels, re-encoded) are read with
``llm.collective_rpc("autoselect_counts")``, one dict per worker (:class:`WorkerExtension`).
"""
from __future__ import annotations

from .version import ARCHITECTURE, MODEL_CLASS, SUPPORTED_VLLM, WORKER_EXTENSION, check_vllm_version

__all__ = ["ARCHITECTURE", "SUPPORTED_VLLM", "WORKER_EXTENSION", "WorkerExtension", "check_vllm_version", "register"]


class WorkerExtension:
    """Mixed into vLLM's worker class when a model uses ``AutoSelectQwen2_5_VL`` (the plugin sets
    ``worker_extension_cls`` unless the user set one), so that ``llm.collective_rpc("autoselect_counts")``
    works in vLLM's default mode, where the engine runs in another process and ``apply_model`` cannot
    send a lambda there."""

    def autoselect_counts(self) -> dict[str, int]:
        """What happened to the images so far (see the model's ``autoselect_counts``)."""
        return dict(self.get_model().autoselect_counts)


def register() -> None:
    """vLLM's plugin hook: register ``AutoSelectQwen2_5_VL`` lazily (vLLM imports the class when a model
    asks for it), and its configuration check (:class:`~autoselect_fast.vllm_plugin.settings.ConfigCheck`,
    run where vLLM builds its configuration, before it starts the engine). Never raises: vLLM calls every
    plugin unguarded, and an unsupported vLLM version must not stop models that do not use this one. The
    version is checked when a model asks for the architecture."""
    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)
    try:
        from vllm.model_executor.models import config as model_config_hooks
    except ImportError:  # another vLLM version: the model module refuses it, naming the supported range
        return
    hooks = getattr(model_config_hooks, "MODELS_CONFIG_MAP", None)
    if isinstance(hooks, dict):
        from .settings import ConfigCheck

        hooks.setdefault(ARCHITECTURE, ConfigCheck)
