"""The SGLang plugin entry point: register every hook of ``hooks.HOOKS``, each once.

SGLang discovers ``register`` through the ``sglang.srt.plugins`` entry-point group and calls it in
every process (launcher, scheduler, detokenizer), then applies all registered hooks. It only logs
a plugin's errors, so the model-load hook and the launcher call ``verify_hooks`` and raise when a
mode was asked for but our hooks are not in the call chain.

Nothing is loaded unless asked: this module imports only ``os``, and ``register`` imports the
hooks (and with them the config, the runtime and the step) only when ``asked()``. A process
without our settings pays for this module alone and runs stock SGLang.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

# The same names as lynx_sglang.config's ENV_PREFIX and env_name("mode"), written out because
# importing config would cost every SGLang process (tests check that they agree).
ENV_PREFIX = "LYNX_SGLANG_"
MODE_ENV = ENV_PREFIX + "MODE"

__all__ = ["ENV_PREFIX", "MODE_ENV", "asked", "install", "register"]


def asked(environ: Mapping[str, str] | None = None) -> bool:
    """Whether this process was asked to run lynx-sglang: one of our ``LYNX_SGLANG_*`` variables
    is set and ``LYNX_SGLANG_MODE`` does not say ``off``.

    The launcher exports every setting, mode included, so its scheduler processes are asked exactly
    when a mode is on. Any other variable of ours counts (a misspelt one too, so that the start-up
    check names it); another program's ``LYNX_*`` does not.
    """
    environ = os.environ if environ is None else environ
    if environ.get(MODE_ENV, "").strip() == "off":  # as LynxConfig.from_env reads it
        return False
    return any(key.startswith(ENV_PREFIX) for key in environ)


def register() -> None:
    """Register our hooks with SGLang's HookRegistry (each once, however often this is called).

    A no-op, importing nothing, unless ``asked()``: installing the package leaves servers that
    do not use it exactly stock.
    """
    if asked():
        _register_hooks()


def install() -> None:
    """Register and apply now, asked or not: calling it is the request (direct use and tests;
    SGLang's ``load_plugins`` calls ``register`` and applies)."""
    from sglang.srt.plugins.hook_registry import HookRegistry

    _register_hooks()
    HookRegistry.apply_hooks()


def _register_hooks() -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry

    from lynx_sglang.sglang.hooks import HOOKS

    for hook in HOOKS:
        registered = HookRegistry._hooks.get(hook.target, ())
        if not any(fn is hook.fn for _, fn, _ in registered):
            HookRegistry.register(hook.target, hook.fn, hook.kind)

