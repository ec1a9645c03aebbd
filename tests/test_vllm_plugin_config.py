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
    """Only register(), the configuration hook and the model module import vLLM: a process that merely
    imports autoselect_fast (or vLLM's plugin loader resolving the entry point) does not pay for it."""
    import subprocess
    import sys

    code = ("import sys, autoselect_fast, autoselect_fast.vllm_plugin, autoselect_fast.vllm_plugin.settings, autoselect_fast.engine; "
            "print('vllm' in sys.modules)")
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


# --------------------------------------------------------------------------------------------------
# The settings (hf_overrides keys autoselect_*), checked without vLLM; inside vLLM by test_vllm_plugin.py
# --------------------------------------------------------------------------------------------------
@pytest.fixture
def scorer_dir(tmp_path):
    return str(tmp_path)  # PluginSettings only checks that it is a directory; the Scorer is loaded later


def settings_from(**given):
    from types import SimpleNamespace

    from autoselect_fast.vllm_plugin.settings import PluginSettings

    return PluginSettings.from_config(SimpleNamespace(model_type="qwen2_5_vl", **{f"autoselect_{k}": v for k, v in given.items()}))


@pytest.mark.parametrize(
    "given,first_line",
    [
        ({"keep_ratio": 0}, "autoselect_keep_ratio=0: keep_ratio must be a float in (0, 1], got 0"),
        ({"keep_ratio": 0.0}, "autoselect_keep_ratio=0.0: keep_ratio must be a float in (0, 1], got 0.0"),
        ({"keep_ratio": "0.5"}, "autoselect_keep_ratio=\"0.5\": keep_ratio must be a float in (0, 1], got '0.5'"),
        ({"keep": 0}, "autoselect_keep=0: keep must be an int >= 1, got 0"),
        ({"keep": True}, "autoselect_keep=true: keep must be an int >= 1, got True"),
        ({"keep_ratio": 0.5, "position_mode": "shifted"}, 'autoselect_position_mode="shifted": must be one of "original", "compact"'),
        ({"keep_ratio": 0.5, "keep_ration": 0.5, "scorers": "x"},
         'autoselect_keep_ration=0.5, autoselect_scorers="x": unknown settings; known: autoselect_keep, autoselect_keep_ratio, '
         "autoselect_position_mode, autoselect_scorer"),
    ],
    ids=["ratio-int-zero", "ratio-float-zero", "ratio-string", "keep-zero", "keep-bool", "position-mode", "two-unknown"],
)
def test_a_bad_setting_names_itself_and_its_value_as_given(scorer_dir, given, first_line):
    from autoselect_fast.vllm_plugin.settings import SettingError

    with pytest.raises(SettingError) as info:
        settings_from(scorer=scorer_dir, **given)
    assert str(info.value).splitlines()[0] == "autoselect_fast: " + first_line
    assert not isinstance(info.value, ValueError)  # vLLM's pydantic config would bury a ValueError in its own message


def test_missing_scorer_and_budget_name_the_missing_settings(scorer_dir):
    from autoselect_fast.vllm_plugin.settings import SettingError

    with pytest.raises(SettingError) as info:
        settings_from(keep=4)
    assert str(info.value) == ("autoselect_fast: autoselect_scorer is missing: hf_overrides must give the directory of a Scorer "
                               "checkpoint (Scorer.save_pretrained)")
    with pytest.raises(SettingError) as info:
        settings_from(scorer=scorer_dir)
    assert str(info.value) == ("autoselect_fast: autoselect_keep and autoselect_keep_ratio are both missing: give exactly one of "
                               "keep (K per image) and keep_ratio, got keep=None, keep_ratio=None")


def test_good_settings_keep_their_values_and_an_integer_ratio_becomes_a_float(scorer_dir):
    settings = settings_from(scorer=scorer_dir, keep_ratio=1)
    assert (settings.scorer, settings.keep, settings.keep_ratio, settings.position_mode) == (scorer_dir, None, 1.0, "original")
    assert type(settings.keep_ratio) is float and settings.budget(32) == 32
    settings = settings_from(scorer=scorer_dir, keep=20, position_mode="compact")
    assert (settings.keep, settings.keep_ratio, settings.position_mode) == (20, None, "compact")
    assert [settings.budget(n) for n in (8, 20, 64)] == [8, 20, 20]  # clipped to N_i
