"""The vLLM versions the plugin supports and the names it registers (no vLLM import here)."""
from __future__ import annotations

ARCHITECTURE = "AutoSelectQwen2_5_VL"
SUPPORTED_VLLM = (">=0.32", "<0.33")
MODEL_CLASS = "autoselect_fast.vllm_plugin.qwen2_5_vl:AutoSelectQwen2_5_VLForConditionalGeneration"
WORKER_EXTENSION = "autoselect_fast.vllm_plugin.WorkerExtension"  # vLLM's parallel_config.worker_extension_cls


def check_vllm_version(version: str) -> None:
    """Raise ImportError naming the supported range when ``version`` lies outside it."""
    parts = version.split("+")[0].split(".")
    try:
        major, minor = int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        raise ImportError(f"autoselect_fast: the vLLM plugin cannot read the vLLM version {version!r}") from None
    if (major, minor) != (0, 32):
        raise ImportError(
            f"autoselect_fast: the vLLM plugin supports vLLM {','.join(SUPPORTED_VLLM)} (it subclasses vLLM's private "
            f"Qwen2.5-VL classes), but vLLM {version} is installed"
        )
