"""The SGLang plugin entry point: register every hook of ``hooks.HOOKS``, each once.

SGLang discovers ``register`` through the ``sglang.srt.plugins`` entry-point group and calls it in
every process (launcher, scheduler, detokenizer), then applies all registered hooks. It only logs
a plugin's errors, so the model-load hook and the launcher call ``verify_hooks`` and raise when a
mode was asked for but our hooks are not in the call chain.
"""

from __future__ import annotations

from sglang.srt.plugins.hook_registry import HookRegistry

from lynx_sglang.config import wanted
from lynx_sglang.sglang.hooks import (
    HOOKS,
    Hook,
    HooksMissing,
    missing_hooks,
    times_installed,
    verify_hooks,
)

__all__ = [
    "HOOKS",
    "Hook",
    "HooksMissing",
    "install",
    "missing_hooks",
    "register",
    "times_installed",
    "verify_hooks",
    "wanted",
]


def register() -> None:
    """Register our hooks with SGLang's HookRegistry (each once, however often this is called).

    A no-op unless one of our ``LYNX_SGLANG_*`` settings is present, so installing the package
    leaves servers that do not use it exactly stock (another program's ``LYNX_*`` is not ours).
    """
    if not wanted():
        return
    for hook in HOOKS:
        registered = HookRegistry._hooks.get(hook.target, ())
        if not any(fn is hook.fn for _, fn, _ in registered):
            HookRegistry.register(hook.target, hook.fn, hook.kind)


def install() -> None:
    """Register and apply now (SGLang's ``load_plugins`` does both; for direct use and tests)."""
    register()
    HookRegistry.apply_hooks()
