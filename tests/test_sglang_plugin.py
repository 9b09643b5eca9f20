"""The plugin through SGLang's own loader: discovered by entry point, installed once however
often it is loaded, nothing of ours imported unless asked, and a requested mode with missing hooks
raises instead of running stock."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("sglang")

from sglang.srt.plugins import GENERAL_PLUGINS_GROUP, load_plugins, load_plugins_by_group  # noqa: E402
from sglang.srt.plugins.hook_registry import HookRegistry  # noqa: E402

from lynx_sglang import config  # noqa: E402
from lynx_sglang.sglang import hooks, plugin  # noqa: E402

# What SGLang's plugin loader imports of ours in a process not asked for lynx-sglang.
ENTRY_ONLY = ["lynx_sglang", "lynx_sglang.sglang", "lynx_sglang.sglang.plugin"]


@pytest.fixture
def lynx_env(monkeypatch):
    """Only our plugin, and a lynx mode so that it registers."""
    monkeypatch.setenv("SGLANG_PLUGINS", "lynx_sglang")
    monkeypatch.setenv("LYNX_SGLANG_MODE", "lynx")


def _without_lynx_env(**extra: str) -> dict[str, str]:
    """This environment less every LYNX_* variable, only our plugin, and ``extra`` on top."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LYNX_")}
    return {**env, "SGLANG_PLUGINS": "lynx_sglang", **extra}


def _run(script: str, env: dict[str, str]) -> str:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_entry_point_is_discovered(lynx_env):
    found = load_plugins_by_group(GENERAL_PLUGINS_GROUP)
    assert "lynx_sglang" in found
    func, dist = found["lynx_sglang"]
    assert func is plugin.register
    assert dist == "lynx-sglang"


def test_hooks_installed_once_when_loaded_twice(lynx_env, monkeypatch):
    import sglang.srt.plugins as plugins

    for _ in range(2):  # two full loads through SGLang (its once-per-process guard reset)
        monkeypatch.setattr(plugins, "_plugins_loaded", False)
        load_plugins()
    plugin.register()  # and direct calls on top
    plugin.register()
    HookRegistry.apply_hooks()
    assert {h.target: hooks.times_installed(h) for h in hooks.HOOKS} == {
        h.target: 1 for h in hooks.HOOKS
    }
    for hook in hooks.HOOKS:
        mine = [fn for _, fn, _ in HookRegistry._hooks[hook.target] if fn is hook.fn]
        assert len(mine) == 1, hook.target


@pytest.mark.slow
def test_missing_hooks_raise_when_a_mode_is_requested():
    """A fresh process in which the plugin registered nothing (no LYNX_SGLANG_* when SGLang loaded it),
    then asked for lynx: the launcher check, SGLang's start-up check and model load all raise."""
    script = textwrap.dedent(
        """
        import os
        from sglang.srt.plugins import load_plugins
        from lynx_sglang.config import LynxConfig
        from lynx_sglang.sglang import hooks, plugin

        load_plugins()
        assert len(hooks.missing_hooks()) == len(hooks.HOOKS), hooks.missing_hooks()
        hooks.verify_hooks(LynxConfig(mode="off"))  # nothing asked: fine
        os.environ["LYNX_SGLANG_MODE"] = "lynx"
        calls = {
            "verify": lambda: hooks.verify_hooks(LynxConfig.from_env()),
            "load_model": lambda: hooks.around_load_model(lambda runner: None, object()),
            "check_server_args": lambda: hooks.after_check_server_args(None, object()),
        }
        for name, call in calls.items():
            try:
                call()
            except hooks.HooksMissing as e:
                assert "\\n" not in str(e)
                print("raised", name)
            else:
                print("silent", name)
        """
    )
    out = _run(script, _without_lynx_env())
    lines = [line for line in out.splitlines() if line.startswith(("raised", "silent"))]
    assert lines == ["raised verify", "raised load_model", "raised check_server_args"]


@pytest.mark.parametrize("mode", [None, "off", " off "])
def test_register_is_a_noop_without_lynx_settings_or_with_mode_off(monkeypatch, mode):
    for key in list(os.environ):
        if key.startswith("LYNX_"):
            monkeypatch.delenv(key)
    if mode is not None:
        monkeypatch.setenv("LYNX_SGLANG_MODE", mode)
        monkeypatch.setenv("LYNX_SGLANG_BUDGET", "0.5")
    assert not plugin.asked()
    before = {t: list(h) for t, h in HookRegistry._hooks.items()}
    plugin.register()
    assert {t: list(h) for t, h in HookRegistry._hooks.items()} == before


def test_asked_means_one_of_our_settings_and_mode_not_off():
    assert not plugin.asked({})
    assert not plugin.asked({"LYNX_MODE": "lynx", "LYNX_HOME": "/opt/lynx"})  # not ours
    assert not plugin.asked({"LYNX_SGLANG_MODE": "off", "LYNX_SGLANG_BUDGET": "0.5"})
    assert plugin.asked({"LYNX_SGLANG_MODE": "lynx"})
    assert plugin.asked({"LYNX_SGLANG_MODE": "lynx+offload", "LYNX_SGLANG_SLOTS": "32"})
    assert plugin.asked({"LYNX_SGLANG_BUDGET": "0.5"})  # as today: the mode check reads it
    assert plugin.asked({"LYNX_SGLANG_MOD": "lynx"})  # misspelt: the start-up check names it


def test_the_entry_point_reads_configs_variable_names():
    """The entry module writes the names out (importing config costs every process): same names."""
    assert plugin.ENV_PREFIX == config.ENV_PREFIX
    assert plugin.MODE_ENV == config.env_name("mode")
    assert config.LynxConfig.from_env({plugin.MODE_ENV: " off "}).mode == "off"
    assert config.LynxConfig().mode == "off"  # the default: the launcher exports it when unset


@pytest.mark.slow
def test_sglang_loads_nothing_of_ours_unless_asked():
    """A fresh process without our settings, then with the mode off: SGLang's loader imports
    the entry module and its packages only, and registers no hook (SGLang stays stock)."""
    script = """
        import json, os, sys
        import sglang.srt.plugins as plugins

        def ours():
            return sorted(m for m in sys.modules if m.split(".")[0] == "lynx_sglang")

        plugins.load_plugins()
        unset = ours()
        os.environ["LYNX_SGLANG_MODE"] = "off"
        plugins._plugins_loaded = False  # SGLang's once-per-process guard
        plugins.load_plugins()
        off = ours()
        from lynx_sglang.sglang import hooks
        print(json.dumps({"unset": unset, "off": off, "missing": hooks.missing_hooks(),
                          "registered": sorted(plugins.HookRegistry._hooks)}))
        """
    got = json.loads(_run(script, _without_lynx_env()).splitlines()[-1])
    assert got["unset"] == ENTRY_ONLY
    assert got["off"] == ENTRY_ONLY
    assert got["missing"] == [h.target for h in hooks.HOOKS]
    assert not set(got["registered"]) & {h.target for h in hooks.HOOKS}


@pytest.mark.slow
def test_sglang_registers_every_hook_once_when_a_mode_is_set():
    """A fresh process with only LYNX_SGLANG_MODE set: SGLang's discovery loads our entry point
    and calling it registers every hook once (SGLang applies them; tested in-process above)."""
    script = """
        import json
        from sglang.srt.plugins import GENERAL_PLUGINS_GROUP, load_plugins_by_group
        from sglang.srt.plugins.hook_registry import HookRegistry
        from lynx_sglang.sglang import hooks

        (register, _), = load_plugins_by_group(GENERAL_PLUGINS_GROUP).values()
        register()
        register()
        print(json.dumps({h.target: sum(fn is h.fn for _, fn, _ in HookRegistry._hooks.get(h.target, ()))
                          for h in hooks.HOOKS}))
        """
    got = json.loads(_run(script, _without_lynx_env(LYNX_SGLANG_MODE="lynx")).splitlines()[-1])
    assert got == {h.target: 1 for h in hooks.HOOKS}


def test_a_foreign_variable_sharing_the_old_prefix_leaves_sglang_stock(monkeypatch):
    """Another program's LYNX_* variables (even LYNX_MODE) are not ours: SGLang's own plugin
    loader registers nothing of ours, and the start-up and model-load paths stay stock."""
    import sglang.srt.plugins as plugins

    from lynx_sglang.sglang import hooks

    for key in list(os.environ):
        if key.startswith("LYNX_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("LYNX_MODE", "lynx")
    monkeypatch.setenv("LYNX_HOME", "/opt/lynx")
    monkeypatch.setenv("SGLANG_PLUGINS", "lynx_sglang")
    before = {t: list(h) for t, h in HookRegistry._hooks.items()}
    monkeypatch.setattr(plugins, "_plugins_loaded", False)
    load_plugins()
    assert {t: list(h) for t, h in HookRegistry._hooks.items()} == before
    assert hooks.after_check_server_args(None, object()) is None  # no config read, no raise
    loaded = []
    hooks.around_load_model(lambda runner: loaded.append(runner), "runner")
    assert loaded == ["runner"]
