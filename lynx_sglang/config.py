"""All lynx-sglang knobs in one frozen dataclass, built from CLI flags or ``LYNX_*`` env vars.

Validated once at construction; nothing deeper in the package reads the environment.
This module imports only the standard library, so the core runs without SGLang.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

MODES = ("off", "lynx", "offload", "lynx+offload")
POLICIES = ("lynx", "oea")
EVICTIONS = ("lru", "lfu", "score")
PREFETCHES = ("off", "temporal", "cross-layer", "both")
EXECUTORS = ("eager", "graph")
SLOT_POOLS = ("layer", "shared")

ENV_PREFIX = "LYNX_"


class ConfigError(ValueError):
    """A bad lynx-sglang setting; the message is one line naming the flag and what it accepts."""


@dataclass(frozen=True)
class LynxConfig:
    """Every knob of the plugin. Defaults are the recommended setting."""

    # What runs: selection only, the expert cache only, both, or nothing.
    mode: str = "off"

    # --- selection (Lynx policy) ---
    policy: str = "lynx"
    # Fraction of the batch's distinct experts to keep (1.0 keeps all: exact pass-through).
    budget: float = 0.6
    # Absolute cap on the kept set (0: no cap). Protected choices are kept even past the cap.
    max_experts: int = 0
    # Each token's top-`protect_top` choices are never moved (OEA: its top-k0).
    protect_top: int = 1
    # Also protect a token's choices while their cumulative router probability is below this
    # (0 disables). A confident token (top-1 >= protect_p) protects only its top-1.
    protect_p: float = 0.0
    # Token-confidence bins over the top-1 router probability, and the score weight of the
    # least-confident bin (the most confident bin weighs 1.0; linear in between).
    conf_bins: int = 4
    low_conf_weight: float = 2.0
    # Selection applies only to decode batches with at least this many real tokens.
    min_batch: int = 2
    # Cache-aware selection: resident experts' scores are multiplied by (1 + cache_bonus).
    cache_bonus: float = 0.0

    # --- expert cache (offload) ---
    # GPU slots per MoE layer (0: as many as experts, i.e. everything resident).
    slots: int = 0
    slot_pool: str = "layer"
    eviction: str = "lru"
    lfu_decay: float = 0.9
    prefetch: str = "both"
    # Pass the prefetch prediction through the selection policy before copying.
    prefetch_select: bool = True
    executor: str = "eager"
    # Host memory that must stay free after the pinned store is allocated, in GiB.
    host_headroom_gib: float = 2.0

    # --- observability ---
    # Seconds between counter log lines in the server (0: off).
    log_interval: float = 0.0

    def __post_init__(self) -> None:
        _choice("mode", self.mode, MODES)
        _choice("policy", self.policy, POLICIES)
        _choice("eviction", self.eviction, EVICTIONS)
        _choice("prefetch", self.prefetch, PREFETCHES)
        _choice("executor", self.executor, EXECUTORS)
        _choice("slot_pool", self.slot_pool, SLOT_POOLS)
        if not 0.0 < self.budget <= 1.0:
            raise ConfigError(f"--lynx-budget must be in (0, 1], got {self.budget}")
        _at_least("max_experts", self.max_experts, 0)
        _at_least("protect_top", self.protect_top, 0)
        if not 0.0 <= self.protect_p < 1.0:
            raise ConfigError(f"--lynx-protect-p must be in [0, 1), got {self.protect_p}")
        _at_least("conf_bins", self.conf_bins, 1)
        if self.low_conf_weight < 1.0:
            raise ConfigError(f"--lynx-low-conf-weight must be >= 1, got {self.low_conf_weight}")
        _at_least("min_batch", self.min_batch, 1)
        if self.cache_bonus < 0.0:
            raise ConfigError(f"--lynx-cache-bonus must be >= 0, got {self.cache_bonus}")
        _at_least("slots", self.slots, 0)
        if not 0.0 <= self.lfu_decay <= 1.0:
            raise ConfigError(f"--lynx-lfu-decay must be in [0, 1], got {self.lfu_decay}")
        if self.host_headroom_gib < 0.0:
            raise ConfigError(f"--lynx-host-headroom-gib must be >= 0, got {self.host_headroom_gib}")
        if self.log_interval < 0.0:
            raise ConfigError(f"--lynx-log-interval must be >= 0, got {self.log_interval}")

    # ---- derived ----
    @property
    def selection_on(self) -> bool:
        return self.mode in ("lynx", "lynx+offload")

    @property
    def offload_on(self) -> bool:
        return self.mode in ("offload", "lynx+offload")

    def replace(self, **changes: Any) -> LynxConfig:
        return dataclasses.replace(self, **changes)

    # ---- environment ----
    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> LynxConfig:
        """Build from ``LYNX_<FIELD>`` variables (e.g. ``LYNX_MODE=lynx``); unknown ones fail."""
        environ = os.environ if environ is None else environ
        known = {_env_name(f.name): f for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, raw in environ.items():
            if not key.startswith(ENV_PREFIX):
                continue
            f = known.get(key)
            if f is None:
                raise ConfigError(
                    f"unknown environment variable {key}; lynx-sglang reads "
                    + ", ".join(sorted(known))
                )
            values[f.name] = _parse(f, raw, source=key)
        return cls(**values)

    def to_env(self) -> dict[str, str]:
        """The ``LYNX_*`` variables that rebuild this config in a spawned process."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[_env_name(f.name)] = ("1" if v else "0") if isinstance(v, bool) else str(v)
        return out

    # ---- command line ----
    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser) -> None:
        """Register ``--lynx-*`` flags (all default to None: unset flags fall back to env/defaults)."""
        group = parser.add_argument_group("lynx-sglang (batch-aware expert selection + expert cache)")
        for f in fields(LynxConfig):
            flag = _flag_name(f.name)
            default = f.default
            kind = _field_type(f)
            help_text = _HELP.get(f.name, "")
            choices = _CHOICES.get(f.name)
            if kind is bool:
                group.add_argument(flag, dest=_dest(f.name), type=_parse_bool_flag(flag),
                                   default=None, metavar="{0,1}",
                                   help=f"{help_text} (default {int(default)})")
            else:
                group.add_argument(flag, dest=_dest(f.name), type=_typed(kind, flag),
                                   choices=choices, default=None,
                                   help=f"{help_text} (default {default})")

    @classmethod
    def from_cli_args(
        cls, args: argparse.Namespace, environ: Mapping[str, str] | None = None
    ) -> LynxConfig:
        """Flags override ``LYNX_*`` env vars, which override defaults."""
        base = cls.from_env(environ)
        changes = {}
        for f in fields(cls):
            v = getattr(args, _dest(f.name), None)
            if v is not None:
                changes[f.name] = v
        return base.replace(**changes) if changes else base


_HELP = {
    "mode": "what runs on decode batches: off, lynx (selection), offload (expert cache), lynx+offload",
    "policy": "selection policy: lynx (confidence-binned batch scores) or oea (keep each token's top-k0)",
    "budget": "fraction of a decode batch's distinct experts to keep, in (0, 1]",
    "max_experts": "absolute cap on kept experts per layer and step (0: none)",
    "protect_top": "each token's top-N router choices are never remapped",
    "protect_p": "also protect choices until their cumulative router probability reaches p (0: off)",
    "conf_bins": "number of token-confidence bins over the top-1 router probability",
    "low_conf_weight": "score weight of the least-confident bin (most confident weighs 1)",
    "min_batch": "apply selection only to decode batches with at least this many tokens",
    "cache_bonus": "cache-aware selection: resident experts' scores x (1 + bonus)",
    "slots": "GPU expert slots per MoE layer for the expert cache (0: all experts)",
    "slot_pool": "slots per layer, or one pool shared by all layers",
    "eviction": "expert cache eviction policy",
    "lfu_decay": "per-step decay of LFU frequencies",
    "prefetch": "prefetch predictor: previous step's set, next layer's router, or both",
    "prefetch_select": "pass the prefetch prediction through the selection policy",
    "executor": "eager (host plans copies) or graph (device-side, CUDA-graph safe)",
    "host_headroom_gib": "host memory that must remain free after pinning the expert store",
    "log_interval": "seconds between counter log lines (0: off)",
}

_CHOICES = {
    "mode": MODES,
    "policy": POLICIES,
    "eviction": EVICTIONS,
    "prefetch": PREFETCHES,
    "executor": EXECUTORS,
    "slot_pool": SLOT_POOLS,
}


def _env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


def _flag_name(name: str) -> str:
    return "--lynx-" + name.replace("_", "-")


def _dest(name: str) -> str:
    return "lynx_" + name


def _field_type(f: dataclasses.Field) -> type:
    return type(f.default)


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{_flag_name(name)} must be one of {', '.join(allowed)}; got {value!r}")


def _at_least(name: str, value: int, low: int) -> None:
    if value < low:
        raise ConfigError(f"{_flag_name(name)} must be >= {low}, got {value}")


def _parse_bool(raw: str, source: str) -> bool:
    low = raw.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{source} must be 0/1/true/false, got {raw!r}")


def _parse(f: dataclasses.Field, raw: str, source: str) -> Any:
    kind = _field_type(f)
    if kind is bool:
        return _parse_bool(raw, source)
    try:
        return kind(raw.strip())
    except ValueError:
        raise ConfigError(f"{source} must be {kind.__name__}, got {raw!r}") from None


def _typed(kind: type, flag: str):
    def convert(raw: str):
        try:
            return kind(raw)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} must be {kind.__name__}, got {raw!r}") from None

    convert.__name__ = kind.__name__
    return convert


def _parse_bool_flag(flag: str):
    def convert(raw: str) -> bool:
        try:
            return _parse_bool(raw, flag)
        except ConfigError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return convert
