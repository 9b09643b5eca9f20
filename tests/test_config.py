"""LynxConfig: defaults validate, bad values fail with one clear line, env vars round-trip."""

import argparse

import pytest

from lynx_sglang.config import CacheParams, ConfigError, LynxConfig, SelectionParams, wanted


def test_defaults_are_valid_and_off():
    c = LynxConfig()
    assert c.mode == "off" and not c.selection_on and not c.offload_on


@pytest.mark.parametrize(
    "mode, sel, off",
    [("lynx", True, False), ("offload", False, True), ("lynx+offload", True, True)],
)
def test_mode_switches(mode, sel, off):
    c = LynxConfig(mode=mode)
    assert (c.selection_on, c.offload_on) == (sel, off)


@pytest.mark.parametrize(
    "field, value, flag",
    [
        ("mode", "fast", "--lynx-mode"),
        ("budget", 0.0, "--lynx-budget"),
        ("budget", 1.5, "--lynx-budget"),
        ("protect_p", 1.0, "--lynx-protect-p"),
        ("slots", -1, "--lynx-slots"),
        ("eviction", "fifo", "--lynx-eviction"),
        ("low_conf_weight", 0.5, "--lynx-low-conf-weight"),
    ],
)
def test_bad_values_fail_with_one_line_naming_the_flag(field, value, flag):
    with pytest.raises(ConfigError) as e:
        LynxConfig(**{field: value})
    assert flag in str(e.value) and "\n" not in str(e.value)


def test_env_round_trip():
    c = LynxConfig(mode="lynx+offload", budget=0.5, slots=24, prefetch_select=False, eviction="lfu")
    assert LynxConfig.from_env(c.to_env()) == c


def test_env_rejects_unknown_and_malformed():
    with pytest.raises(ConfigError, match="LYNX_SGLANG_BUDGTE"):
        LynxConfig.from_env({"LYNX_SGLANG_BUDGTE": "0.5"})
    with pytest.raises(ConfigError, match="LYNX_SGLANG_SLOTS"):
        LynxConfig.from_env({"LYNX_SGLANG_SLOTS": "many"})
    with pytest.raises(ConfigError, match="LYNX_SGLANG_PREFETCH_SELECT"):
        LynxConfig.from_env({"LYNX_SGLANG_PREFETCH_SELECT": "maybe"})


def test_a_misspelt_variable_of_ours_names_the_closest_match_in_one_line():
    with pytest.raises(ConfigError) as e:
        LynxConfig.from_env({"LYNX_SGLANG_BUDGTE": "0.5"})
    assert "did you mean LYNX_SGLANG_BUDGET?" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="did you mean 'budget'"):
        LynxConfig(budgte=0.5)


def test_foreign_variables_sharing_the_old_prefix_are_not_ours():
    """Another program's LYNX_* (or a stale LYNX_MODE) neither fails nor turns the plugin on."""
    foreign = {"LYNX_HOME": "/opt/lynx", "LYNX_MODE": "lynx", "LYNX_CFG": "x"}
    assert LynxConfig.from_env(foreign) == LynxConfig()
    assert not wanted(foreign)
    assert wanted({**foreign, "LYNX_SGLANG_MODE": "off"})


def test_sections_hold_each_setting_once():
    c = LynxConfig(mode="lynx+offload", budget=0.5, slots=24, eviction="lfu")
    assert c.selection == SelectionParams(budget=0.5) and c.selection.budget == c.budget
    assert c.cache == CacheParams(slots=24, eviction="lfu") and c.cache.slots == c.slots
    assert c.replace(budget=0.7, mode="lynx").selection.budget == 0.7


def test_flags_override_env():
    p = argparse.ArgumentParser()
    LynxConfig.add_cli_args(p)
    args = p.parse_args(["--lynx-mode", "lynx", "--lynx-budget", "0.7"])
    c = LynxConfig.from_cli_args(args, {"LYNX_SGLANG_BUDGET": "0.4", "LYNX_SGLANG_SLOTS": "16"})
    assert (c.mode, c.budget, c.slots) == ("lynx", 0.7, 16)


def test_bad_flag_value_is_an_argparse_error(capsys):
    p = argparse.ArgumentParser()
    LynxConfig.add_cli_args(p)
    with pytest.raises(SystemExit):
        p.parse_args(["--lynx-slots", "lots"])
    assert "--lynx-slots must be int" in capsys.readouterr().err
