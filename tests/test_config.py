"""LynxConfig: defaults validate, bad values fail with one clear line, env vars round-trip."""

import argparse

import pytest

from lynx_sglang.config import ConfigError, LynxConfig


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
    with pytest.raises(ConfigError, match="LYNX_BUDGTE"):
        LynxConfig.from_env({"LYNX_BUDGTE": "0.5"})
    with pytest.raises(ConfigError, match="LYNX_SLOTS"):
        LynxConfig.from_env({"LYNX_SLOTS": "many"})
    with pytest.raises(ConfigError, match="LYNX_PREFETCH_SELECT"):
        LynxConfig.from_env({"LYNX_PREFETCH_SELECT": "maybe"})


def test_flags_override_env():
    p = argparse.ArgumentParser()
    LynxConfig.add_cli_args(p)
    args = p.parse_args(["--lynx-mode", "lynx", "--lynx-budget", "0.7"])
    c = LynxConfig.from_cli_args(args, {"LYNX_BUDGET": "0.4", "LYNX_SLOTS": "16"})
    assert (c.mode, c.budget, c.slots) == ("lynx", 0.7, 16)


def test_bad_flag_value_is_an_argparse_error(capsys):
    p = argparse.ArgumentParser()
    LynxConfig.add_cli_args(p)
    with pytest.raises(SystemExit):
        p.parse_args(["--lynx-slots", "lots"])
    assert "--lynx-slots must be int" in capsys.readouterr().err
