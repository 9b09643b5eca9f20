"""The plugin through SGLang's own loader: discovered by entry point, installed once however
often it is loaded, and a requested mode with missing hooks raises instead of running stock."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("sglang")

from sglang.srt.plugins import GENERAL_PLUGINS_GROUP, load_plugins, load_plugins_by_group  # noqa: E402
from sglang.srt.plugins.hook_registry import HookRegistry  # noqa: E402

from lynx_sglang.sglang import plugin  # noqa: E402


@pytest.fixture
def lynx_env(monkeypatch):
    """Only our plugin, and a LYNX_SGLANG_* setting so that it registers."""
    monkeypatch.setenv("SGLANG_PLUGINS", "lynx_sglang")
    monkeypatch.setenv("LYNX_SGLANG_MODE", "off")


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
    assert {h.target: plugin.times_installed(h) for h in plugin.HOOKS} == {
        h.target: 1 for h in plugin.HOOKS
    }
    for hook in plugin.HOOKS:
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
        assert len(plugin.missing_hooks()) == len(plugin.HOOKS), plugin.missing_hooks()
        plugin.verify_hooks(LynxConfig(mode="off"))  # nothing asked: fine
        os.environ["LYNX_SGLANG_MODE"] = "lynx"
        calls = {
            "verify": lambda: plugin.verify_hooks(LynxConfig.from_env()),
            "load_model": lambda: hooks.around_load_model(lambda runner: None, object()),
            "check_server_args": lambda: hooks.after_check_server_args(None, object()),
        }
        for name, call in calls.items():
            try:
                call()
            except plugin.HooksMissing as e:
                assert "\\n" not in str(e)
                print("raised", name)
            else:
                print("silent", name)
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("LYNX_")}
    env["SGLANG_PLUGINS"] = "lynx_sglang"
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith(("raised", "silent"))]
    assert lines == ["raised verify", "raised load_model", "raised check_server_args"]


def test_register_is_a_noop_without_lynx_settings(monkeypatch):
    for key in list(os.environ):
        if key.startswith("LYNX_"):
            monkeypatch.delenv(key)
    assert not plugin.wanted()
    before = {t: list(h) for t, h in HookRegistry._hooks.items()}
    plugin.register()
    assert {t: list(h) for t, h in HookRegistry._hooks.items()} == before


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
