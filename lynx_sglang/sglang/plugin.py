"""The SGLang plugin entry point: every hook we place, registered in one table, idempotently.

SGLang discovers ``register`` through the ``sglang.srt.plugins`` entry-point group and calls it in
every process (launcher, scheduler, detokenizer), then applies all registered hooks. It only logs
a plugin's errors, so the model-load hook and the launcher call ``verify_hooks`` and raise when a
mode was asked for but our hooks are not in the call chain.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import NamedTuple

from sglang.srt.plugins.hook_registry import HookRegistry, HookType

from lynx_sglang.config import ENV_PREFIX, LynxConfig
from lynx_sglang.sglang import hooks


class Hook(NamedTuple):
    """One hook: the SGLang function it wraps, our function, and how it wraps."""

    target: str
    fn: Callable
    kind: HookType


_RUNNER = "sglang.srt.model_executor.model_runner.ModelRunner"
_GRAPH = "sglang.srt.model_executor.runner.decode_cuda_graph_runner.DecodeCudaGraphRunner"
_TOPK = "sglang.srt.layers.moe.topk.TopK"

HOOKS: tuple[Hook, ...] = (
    # Main process: validate the lynx settings against the resolved server config.
    Hook(
        "sglang.srt.server_args.ServerArgs.check_server_args",
        hooks.after_check_server_args,
        HookType.AFTER,
    ),
    # Scheduler: build the runtime (store, cache) before the model is built; check after.
    Hook(f"{_RUNNER}.load_model", hooks.around_load_model, HookType.AROUND),
    # Every forward: is it a pure decode batch, and how many rows are real.
    Hook(f"{_RUNNER}._forward_raw", hooks.around_forward_raw, HookType.AROUND),
    Hook(f"{_GRAPH}.capture_one_shape", hooks.around_capture_one_shape, HookType.AROUND),
    # Selection: rewrite the TopK output of decode batches.
    Hook(f"{_TOPK}.forward_native", hooks.after_topk, HookType.AFTER),
    Hook(f"{_TOPK}.forward_cuda", hooks.after_topk, HookType.AFTER),
    Hook(f"{_TOPK}.forward_cpu", hooks.after_topk, HookType.AFTER),
    # Offload: give each FusedMoE our quant method (K GPU slots over the host store).
    Hook(
        "sglang.srt.layers.moe.fused_moe_triton.layer.FusedMoE.__init__",
        hooks.before_fused_moe_init,
        HookType.BEFORE,
    ),
)


class HooksMissing(RuntimeError):
    """A lynx mode was requested but some of our hooks are not installed (one line)."""


def wanted() -> bool:
    """Whether this process was asked to run lynx-sglang (any ``LYNX_*`` variable is set)."""
    return any(key.startswith(ENV_PREFIX) for key in os.environ)


def register() -> None:
    """Register our hooks with SGLang's HookRegistry (each once, however often this is called).

    A no-op unless ``LYNX_*`` settings are present, so installing the package leaves servers
    that do not use it exactly stock.
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


def times_installed(hook: Hook) -> int:
    """How many times ``hook.fn`` sits in the call chain of its target (0: not installed).

    Imports nothing: a target whose module was never imported cannot have been patched."""
    owner_path, attr = hook.target.rsplit(".", 1)
    owner = _imported(owner_path)
    if owner is None:
        return 0
    fn = owner.__dict__.get(attr) if isinstance(owner, type) else getattr(owner, attr, None)
    count = 0
    while fn is not None:
        cells = getattr(fn, "__closure__", None) or ()
        count += sum(1 for cell in cells if _cell(cell) is hook.fn)
        fn = getattr(fn, "__wrapped__", None)
    return count


def missing_hooks() -> list[str]:
    """Targets whose hook is not in the call chain."""
    return [hook.target for hook in HOOKS if times_installed(hook) == 0]


def verify_hooks(cfg: LynxConfig) -> None:
    """Raise ``HooksMissing`` when ``cfg`` asks for a mode and any hook is not installed."""
    if cfg.mode == "off":
        return
    missing = missing_hooks()
    if missing:
        raise HooksMissing(
            f"lynx-sglang --lynx-mode {cfg.mode}: the SGLang plugin hooks are not installed "
            f"({len(missing)} missing, e.g. {missing[0]}); check that the lynx_sglang plugin is "
            "installed (pip install -e .), not excluded by SGLANG_PLUGINS, and loaded without "
            "errors (see the SGLang log)"
        )


def _imported(path: str) -> object | None:
    """The object at dotted ``path`` if its module is already imported, else None."""
    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        module = sys.modules.get(".".join(parts[:i]))
        if module is not None:
            obj: object = module
            for name in parts[i:]:
                obj = getattr(obj, name, None)
                if obj is None:
                    return None
            return obj
    return None


def _cell(cell: object) -> object:
    try:
        return cell.cell_contents  # type: ignore[attr-defined]
    except ValueError:  # an empty cell
        return None
