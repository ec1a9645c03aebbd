"""The vLLM plugin's packaging and version guard, without vLLM (the plugin itself is tested inside vLLM
by tests/test_vllm_plugin.py, in the environment .ci/vllm_env.sh builds)."""
from importlib.metadata import entry_points

import pytest

from autoselect_fast.vllm_plugin import ARCHITECTURE, SUPPORTED_VLLM, check_vllm_version


def test_the_plugin_is_registered_with_vllms_entry_point_group():
    found = [e for e in entry_points(group="vllm.general_plugins") if e.name == "autoselect_fast"]
    assert found, "pip install the package: setup.py declares the vllm.general_plugins entry point"
    assert found[0].value == "autoselect_fast.vllm_plugin:register"


def test_importing_the_package_or_the_plugin_hook_needs_no_vllm():
    """Only register() and the model module import vLLM: a process that merely imports autoselect_fast
    (or vLLM's plugin loader resolving the entry point) does not pay for it."""
    import subprocess
    import sys

    code = "import sys, autoselect_fast, autoselect_fast.vllm_plugin, autoselect_fast.engine; print('vllm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"
    assert ARCHITECTURE == "AutoSelectQwen2_5_VL"


@pytest.mark.parametrize("version", ["0.32.0", "0.32.3", "0.32.0+cpu"])
def test_supported_vllm_versions_pass(version):
    check_vllm_version(version)


@pytest.mark.parametrize("version", ["0.31.2", "0.33.0", "1.0.0"])
def test_other_vllm_versions_are_refused_naming_the_supported_range(version):
    with pytest.raises(ImportError, match=rf"supports vLLM {SUPPORTED_VLLM[0]},{SUPPORTED_VLLM[1]}.*vLLM {version} is installed"):
        check_vllm_version(version)
