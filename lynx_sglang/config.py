"""All lynx-sglang knobs: one frozen config with a selection section and a cache section.

Each choice tuple and each default is declared once, here, and the sections are handed to the
parts that use them (``SelectionParams`` to the policy and its kernels, ``CacheParams`` to the
expert cache). Settings come from ``--lynx-*`` flags or ``LYNX_SGLANG_*`` environment variables
(a prefix no other program uses); nothing deeper in the package reads the environment.
This module imports only the standard library, so the core runs without SGLang.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

MODES = ("off", "lynx", "offload", "lynx+offload")
# How a decode batch's unkept choices are handled (the kept set is Lynx's batch-wide scores for
# all but "oea", which keeps only each token's protected top choices):
#   lynx     moved to the token's best kept expert, weights renormalised by router probability
#   drop     dropped (weight 0), the token's kept choices renormalised to its original sum
#   similar  moved to the kept expert most similar to the one lost (expert weights, at load),
#            keeping the original weight; experts with no similar peer are never moved
#   oea      as lynx, with the kept set only the tokens' top-k0 (protect_top) choices
SELECTION_POLICIES = ("lynx", "drop", "similar", "oea")
EVICTIONS = ("lru", "lfu", "score", "path")
PREFETCHES = ("off", "temporal", "cross-layer", "both")
EXECUTORS = ("hybrid", "eager", "graph")
SLOT_POOLS = ("layer", "shared")
ADMISSIONS = ("fcfs", "overlap")
# The format the host store and the slots hold: the checkpoint's own, or a bf16/fp16
# checkpoint's experts quantised once at load (round to nearest, no calibration data) to block
# FP8 (e4m3, 128 x 128 float32 scales: the layout of DeepSeek-V3's and Qwen's FP8 releases).
EXPERT_FORMATS = ("checkpoint", "fp8", "int4")

# Our environment variables: LYNX_SGLANG_<FIELD>. Only these are read, and only they turn the
# plugin on; a variable that merely starts with LYNX_ belongs to someone else.
ENV_PREFIX = "LYNX_SGLANG_"
FLAG_PREFIX = "--lynx-"
# The budget is applied in integer millionths, so ceil(0.6 * 10) is 6 (float32 would say 7).
BUDGET_SCALE = 1_000_000


class ConfigError(ValueError):
    """A bad lynx-sglang setting; the message is one line naming the flag and what it accepts."""


@dataclass(frozen=True)
class SelectionParams:
    """Selection section: the batch-aware expert-selection policy (decode batches only)."""

    policy: str = "lynx"
    # Fraction of the batch's distinct experts to keep (1.0 keeps all: exact pass-through).
    # Defaults from bench/quality.py's frontier (both shipped models, code at batch 16 and 32,
    # prose at 16): the setting meeting Δppl <= +0.5 % and Δ top-1 accuracy >= -0.5 points on
    # the 95 % bound in every one of those runs.
    budget: float = 0.9
    # Absolute cap on the kept set (0: no cap). Protected choices are kept even past the cap.
    max_experts: int = 0
    # Each token's top-`protect_top` choices are never moved (OEA: its top-k0).
    protect_top: int = 1
    # Also protect a token's choices while the router mass ranked before them is below this.
    protect_p: float = 0.0
    # Token-confidence bins over the top-1 router probability, and the score weight of the
    # least-confident bin (the most confident bin weighs 1.0; linear in between).
    conf_bins: int = 4
    low_conf_weight: float = 2.0
    # Selection applies only to decode batches with at least this many real tokens.
    min_batch: int = 2
    # Cache-aware selection: resident experts' scores are multiplied by (1 + cache_bonus).
    cache_bonus: float = 0.0
    # Miss-aware selection, with the expert cache: every needed expert already resident is kept,
    # and this budget applies only to the ones the step would copy:
    # n = resident + ceil(miss_budget * missing) (0: off, `budget` applies to all). Without the
    # cache every expert is resident, nothing can miss, and `budget` applies.
    miss_budget: float = 0.7
    # Per-layer budgets overriding `budget` (and `miss_budget`), as "layer:budget" pairs of
    # MoE-layer index and budget; `python -m bench.calibrate` writes a preset for a model. None
    # by default: at the default budgets, exempting the first MoE layer gained nothing inside
    # the gate on both shipped models.
    layer_budgets: str = ""
    # "similar": an expert whose highest similarity to any other expert is below this is never
    # moved (it has no stand-in); similarity is the cosine of expert outputs on fixed probes.
    similar_threshold: float = 0.0

    def __post_init__(self) -> None:
        _choice("policy", self.policy, SELECTION_POLICIES)
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
        if not 0.0 <= self.miss_budget <= 1.0:
            raise ConfigError(f"--lynx-miss-budget must be in [0, 1], got {self.miss_budget}")
        if not -1.0 <= self.similar_threshold <= 1.0:
            raise ConfigError(
                f"--lynx-similar-threshold must be in [-1, 1], got {self.similar_threshold}"
            )
        parse_layer_budgets(self.layer_budgets)  # raises on a malformed --lynx-layer-budgets

    @property
    def layer_budget_map(self) -> dict[int, float]:
        """--lynx-layer-budgets as {MoE layer index: budget}."""
        return parse_layer_budgets(self.layer_budgets)

    def at_layer(self, layer: int) -> SelectionParams:
        """The parameters one MoE layer runs with (its own budget where one is given)."""
        return _at_layer(self, layer) if self.layer_budgets else self

    @property
    def budget_ppm(self) -> int:
        """The budget in millionths (integer arithmetic on device, same in torch and Triton)."""
        return round(self.budget * BUDGET_SCALE)

    @property
    def miss_aware(self) -> bool:
        """Whether selection in front of the expert cache budgets only the missing experts."""
        return self.miss_budget > 0.0

    @property
    def miss_budget_ppm(self) -> int:
        return round(self.miss_budget * BUDGET_SCALE)

    def max_kept(self, top_k: int, rows: int) -> int | None:
        """An upper bound on a step's distinct experts after selection, for a decode batch of
        ``rows`` real tokens (None: the selection does not bound it). The kept set is the
        protected experts plus the best others up to n = min(max(ceil(budget * D), k), cap);
        protected choices are kept past the cap, so the bound is max(cap, k, protected); OEA's
        n is k. Batches below ``min_batch`` keep their routing: up to rows * k experts.
        "similar" with a threshold above -1 also keeps every chosen expert without a peer."""
        if rows < self.min_batch:
            return rows * top_k
        if self.protect_p > 0.0:
            return None  # protect_p can protect any number of a token's choices
        if self.policy == "similar" and self.similar_threshold > -1.0:
            return None  # any number of chosen experts may lack a similar peer
        protected = rows * min(self.protect_top, top_k)
        if self.policy == "oea":
            return max(top_k, protected)
        if self.max_experts <= 0:
            return None
        return max(self.max_experts, top_k, protected)


def parse_layer_budgets(text: str) -> dict[int, float]:
    """``"0:1.0,3:0.8"`` -> {0: 1.0, 3: 0.8}; a one-line ConfigError naming the flag otherwise."""
    out: dict[int, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        layer, sep, value = part.partition(":")
        try:
            out[int(layer)] = float(value)
        except ValueError:
            raise ConfigError(
                f"--lynx-layer-budgets takes layer:budget pairs like 0:1.0,3:0.8; got {part!r}"
            ) from None
        if not sep or int(layer) < 0 or not 0.0 < out[int(layer)] <= 1.0:
            raise ConfigError(
                f"--lynx-layer-budgets takes layer:budget pairs, layer >= 0 and budget in "
                f"(0, 1]; got {part!r}"
            )
    return out


@functools.lru_cache(maxsize=4096)
def _at_layer(params: SelectionParams, layer: int) -> SelectionParams:
    """A layer's own budget replaces both budgets (miss-aware stays on if it was)."""
    budget = params.layer_budget_map.get(layer)
    if budget is None:
        return dataclasses.replace(params, layer_budgets="")
    miss = budget if params.miss_aware else 0.0
    return dataclasses.replace(params, budget=budget, miss_budget=miss, layer_budgets="")


@dataclass(frozen=True)
class CacheParams:
    """Cache section: the CPU<->GPU expert cache (offload modes)."""

    # GPU slots per MoE layer (0: as many as experts, i.e. everything resident).
    slots: int = 0
    # Or GPU memory for all layers' slots, in GiB: K per layer follows from the experts' format
    # (bytes per expert, scales included). 0: use ``slots``.
    slot_memory_gib: float = 0.0
    expert_format: str = "checkpoint"
    slot_pool: str = "layer"
    eviction: str = "lru"
    lfu_decay: float = 0.9
    # path eviction: decay of each running request's histogram of its own choices
    path_decay: float = 0.95
    # path eviction: a learned routing-path predictor (python -m bench.train_path_predictor
    # writes <model>/path_predictor.pt); "": the history alone
    path_predictor: str = ""
    # A host-planned step that needs more experts than slots runs in waves; with an eviction
    # that has values it keeps its best-valued experts resident (Belady's MIN's end of a step),
    # in at most this many waves more than the fewest. 1 is the fastest projected on the serving
    # replay; more copies fewer experts (README).
    extra_waves: int = 1
    # Prefetch copied more bytes than it saved on the shipped model's routing
    # (bench/compare_offload.py), so it is off unless asked for.
    prefetch: str = "off"
    # Pass the prefetch prediction through the selection policy before copying.
    prefetch_select: bool = True
    # hybrid: steps captured in a CUDA graph are planned on the device (fixed shapes), every
    # other step on the host (any step, in waves); eager: every step host-planned (CUDA graphs
    # off); graph: every step device-planned (only when every step fits the slots).
    executor: str = "hybrid"
    # Host memory that must stay free after the pinned store is allocated, in GiB.
    host_headroom_gib: float = 2.0
    # Admission: the waiting queue as SGLang orders it, or reordered by each request's
    # estimated routing overlap with the resident experts (no request passed over more than
    # admission_max_passed times). Off by default: on the serving replay it saves bytes only
    # with a loose bound (README).
    admission: str = "fcfs"
    admission_max_passed: int = 32

    def __post_init__(self) -> None:
        _at_least("slots", self.slots, 0)
        if self.slot_memory_gib < 0.0:
            raise ConfigError(f"--lynx-slot-memory-gib must be >= 0, got {self.slot_memory_gib}")
        if self.slot_memory_gib > 0.0 and self.slots > 0:
            raise ConfigError(
                "set one of --lynx-slots (slots per layer) and --lynx-slot-memory-gib (GiB for "
                "all slots), not both"
            )
        _choice("slot_pool", self.slot_pool, SLOT_POOLS)
        _choice("expert_format", self.expert_format, EXPERT_FORMATS)
        _choice("eviction", self.eviction, EVICTIONS)
        if not 0.0 <= self.lfu_decay <= 1.0:
            raise ConfigError(f"--lynx-lfu-decay must be in [0, 1], got {self.lfu_decay}")
        if not 0.0 <= self.path_decay < 1.0:
            raise ConfigError(f"--lynx-path-decay must be in [0, 1), got {self.path_decay}")
        if self.path_predictor and self.eviction != "path":
            raise ConfigError("--lynx-path-predictor is read by --lynx-eviction path only; add it")
        if self.path_predictor and not os.path.isfile(self.path_predictor):
            raise ConfigError(
                f"--lynx-path-predictor {self.path_predictor}: no such file (python -m "
                "bench.train_path_predictor --model <model> writes <model>/path_predictor.pt)"
            )
        _at_least("extra_waves", self.extra_waves, 0)
        _choice("prefetch", self.prefetch, PREFETCHES)
        _choice("executor", self.executor, EXECUTORS)
        _choice("admission", self.admission, ADMISSIONS)
        _at_least("admission_max_passed", self.admission_max_passed, 0)
        if self.host_headroom_gib < 0.0:
            raise ConfigError(
                f"--lynx-host-headroom-gib must be >= 0, got {self.host_headroom_gib}"
            )


_SECTIONS = {"selection": SelectionParams, "cache": CacheParams}
# flat setting name (flag --lynx-<name>, env LYNX_SGLANG_<NAME>) -> its section (None: top level)
_SECTION_OF = {f.name: s for s, cls in _SECTIONS.items() for f in fields(cls)}


@dataclass(frozen=True, init=False)
class LynxConfig:
    """Every knob of the plugin. Defaults are the recommended setting.

    Built from flat setting names, as the flags and variables spell them:
    ``LynxConfig(mode="lynx+offload", budget=0.5, slots=32)``; ``cfg.budget`` reads through to
    its section, and ``cfg.selection`` / ``cfg.cache`` are the sections themselves.
    """

    # What runs: selection only, the expert cache only, both, or nothing.
    mode: str
    selection: SelectionParams
    cache: CacheParams
    # Seconds between counter log lines in the server (0: off).
    log_interval: float

    def __init__(
        self,
        mode: str = "off",
        selection: SelectionParams | None = None,
        cache: CacheParams | None = None,
        log_interval: float = 0.0,
        **settings: Any,
    ) -> None:
        unknown = [name for name in settings if name not in _SECTION_OF]
        if unknown:
            raise ConfigError(f"unknown lynx-sglang setting {unknown[0]!r}{_closest(unknown[0])}")
        parts = {"selection": selection or SelectionParams(), "cache": cache or CacheParams()}
        for section in parts:
            changes = {k: v for k, v in settings.items() if _SECTION_OF[k] == section}
            if changes:
                parts[section] = dataclasses.replace(parts[section], **changes)
        _choice("mode", mode, MODES)
        if log_interval < 0.0:
            raise ConfigError(f"--lynx-log-interval must be >= 0, got {log_interval}")
        object.__setattr__(self, "mode", mode)
        object.__setattr__(self, "selection", parts["selection"])
        object.__setattr__(self, "cache", parts["cache"])
        object.__setattr__(self, "log_interval", log_interval)

    def __getattr__(self, name: str) -> Any:
        section = _SECTION_OF.get(name)
        if section is None:
            raise AttributeError(f"LynxConfig has no setting {name!r}")
        return getattr(object.__getattribute__(self, section), name)

    # ---- derived ----
    @property
    def selection_on(self) -> bool:
        return self.mode in ("lynx", "lynx+offload")

    @property
    def offload_on(self) -> bool:
        return self.mode in ("offload", "lynx+offload")

    def replace(self, **changes: Any) -> LynxConfig:
        """A copy with settings changed (flat names, as in the constructor)."""
        top = {k: changes.pop(k) for k in ("mode", "log_interval") if k in changes}
        return LynxConfig(
            mode=top.get("mode", self.mode),
            selection=self.selection,
            cache=self.cache,
            log_interval=top.get("log_interval", self.log_interval),
            **changes,
        )

    # ---- environment ----
    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> LynxConfig:
        """Build from ``LYNX_SGLANG_<SETTING>`` variables (e.g. ``LYNX_SGLANG_MODE=lynx``).

        Other variables are ignored, even ones that start with ``LYNX_``; a misspelt one of ours
        fails with one line naming the closest match."""
        environ = os.environ if environ is None else environ
        known = {env_name(name): name for name in setting_names()}
        values: dict[str, Any] = {}
        for key, raw in environ.items():
            if not key.startswith(ENV_PREFIX):
                continue
            name = known.get(key)
            if name is None:
                match = difflib.get_close_matches(key, list(known), n=1)
                hint = f"; did you mean {match[0]}?" if match else f"; known: {', '.join(known)}"
                raise ConfigError(f"unknown lynx-sglang environment variable {key}{hint}")
            values[name] = _parse(_default_of(name), raw, source=key)
        return cls(**values)

    def to_env(self) -> dict[str, str]:
        """The ``LYNX_SGLANG_*`` variables that rebuild this config in a spawned process."""
        out = {}
        for name in setting_names():
            v = getattr(self, name)
            out[env_name(name)] = ("1" if v else "0") if isinstance(v, bool) else str(v)
        return out

    # ---- command line ----
    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser) -> None:
        """Register ``--lynx-*`` flags (all default to None: unset flags fall back to env/defaults)."""
        group = parser.add_argument_group(
            "lynx-sglang (batch-aware expert selection + expert cache)"
        )
        for name in setting_names():
            flag, default = flag_name(name), _default_of(name)
            kind = type(default)
            help_text = _HELP.get(name, "")
            if kind is bool:
                group.add_argument(
                    flag,
                    dest=_dest(name),
                    type=_parse_bool_flag(flag),
                    default=None,
                    metavar="{0,1}",
                    help=f"{help_text} (default {int(default)})",
                )
            else:
                group.add_argument(
                    flag,
                    dest=_dest(name),
                    type=_typed(kind, flag),
                    choices=_CHOICES.get(name),
                    default=None,
                    help=f"{help_text} (default {default})",
                )

    @classmethod
    def from_cli_args(
        cls, args: argparse.Namespace, environ: Mapping[str, str] | None = None
    ) -> LynxConfig:
        """Flags override ``LYNX_SGLANG_*`` env vars, which override defaults."""
        base = cls.from_env(environ)
        changes = {}
        for name in setting_names():
            v = getattr(args, _dest(name), None)
            if v is not None:
                changes[name] = v
        return base.replace(**changes) if changes else base


def setting_names() -> list[str]:
    """Every setting's flat name, in flag order (top level first, then the sections)."""
    return ["mode", *_SECTION_OF, "log_interval"]


def env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


def flag_name(name: str) -> str:
    return FLAG_PREFIX + name.replace("_", "-")


def wanted(environ: Mapping[str, str] | None = None) -> bool:
    """Whether this process was asked to run lynx-sglang: one of our variables is set."""
    environ = os.environ if environ is None else environ
    return any(key.startswith(ENV_PREFIX) for key in environ)


_TOP_DEFAULTS = {"mode": "off", "log_interval": 0.0}


def _default_of(name: str) -> Any:
    section = _SECTION_OF.get(name)
    if section is None:
        return _TOP_DEFAULTS[name]
    return next(f.default for f in fields(_SECTIONS[section]) if f.name == name)


_HELP = {
    "mode": "what runs on decode batches: off, lynx (selection), offload (expert cache), lynx+offload",
    "policy": "what happens to unkept choices: lynx (to the token's best kept expert), drop "
    "(weight 0), similar (to the most similar kept expert), oea (lynx, keeping only top-k0)",
    "budget": "fraction of a decode batch's distinct experts to keep, in (0, 1]",
    "max_experts": "absolute cap on kept experts per layer and step (0: none)",
    "protect_top": "each token's top-N router choices are never remapped",
    "protect_p": "also protect choices until their cumulative router probability reaches p (0: off)",
    "conf_bins": "number of token-confidence bins over the top-1 router probability",
    "low_conf_weight": "score weight of the least-confident bin (most confident weighs 1)",
    "min_batch": "apply selection only to decode batches with at least this many tokens",
    "cache_bonus": "cache-aware selection: resident experts' scores x (1 + bonus)",
    "miss_budget": "with the expert cache: keep every needed resident expert and keep this "
    "fraction of the missing ones (0: off, --lynx-budget applies to all)",
    "layer_budgets": "per-layer budgets as layer:budget pairs, e.g. 0:1.0 (others: --lynx-budget)",
    "similar_threshold": "similar policy: never move an expert whose best peer similarity is below this",
    "slots": "GPU expert slots per MoE layer for the expert cache (0: all experts)",
    "slot_memory_gib": "GPU memory for the expert slots of all MoE layers, in GiB: K per layer "
    "follows from the experts' format (bytes per expert, scales included; instead of --lynx-slots)",
    "slot_pool": "slots per layer, or one pool shared by all layers",
    "expert_format": "what the host store and GPU slots hold: the checkpoint's format, fp8 (a "
    "bf16/fp16 checkpoint's experts quantised once at load to block FP8: half the bytes per copy) "
    "or int4 (symmetric int4, one scale per 64 weights, SGLang's triton w4a16 kernel: 0.27x)",
    "eviction": "expert cache eviction policy: lru, lfu, score (the selection's scores) or path "
    "(the running requests' own routing: what they are least likely to route to next goes first)",
    "lfu_decay": "per-step decay of LFU frequencies",
    "path_decay": "path eviction: per-token decay of each running request's routing history",
    "path_predictor": "path eviction: a learned routing-path predictor file (python -m "
    "bench.train_path_predictor writes <model>/path_predictor.pt; empty: the history alone)",
    "extra_waves": "a host-planned step that needs more experts than slots keeps its best-valued "
    "experts (lfu, score, path) in at most this many waves more than the fewest it can run in",
    "admission": "waiting-queue order: SGLang's (fcfs), or overlap: requests whose prompt, read "
    "by each layer's router on its embeddings, routes most to the resident experts go first",
    "admission_max_passed": "overlap admission: a request passed over this many times by later "
    "arrivals goes first",
    "prefetch": "prefetch predictor: previous step's set, next layer's router, or both",
    "prefetch_select": "pass the prefetch prediction through the selection policy",
    "executor": "hybrid (captured decode steps device-side, the rest host-planned), eager or graph",
    "host_headroom_gib": "host memory that must remain free after pinning the expert store",
    "log_interval": "seconds between counter log lines (0: off)",
}

_CHOICES = {
    "mode": MODES,
    "policy": SELECTION_POLICIES,
    "eviction": EVICTIONS,
    "prefetch": PREFETCHES,
    "executor": EXECUTORS,
    "slot_pool": SLOT_POOLS,
    "expert_format": EXPERT_FORMATS,
    "admission": ADMISSIONS,
}


def _dest(name: str) -> str:
    return "lynx_" + name


def _closest(name: str) -> str:
    match = difflib.get_close_matches(name, setting_names(), n=1)
    return f"; did you mean {match[0]!r}?" if match else ""


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{flag_name(name)} must be one of {', '.join(allowed)}; got {value!r}")


def _at_least(name: str, value: int, low: int) -> None:
    if value < low:
        raise ConfigError(f"{flag_name(name)} must be >= {low}, got {value}")


def _parse_bool(raw: str, source: str) -> bool:
    low = raw.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{source} must be 0/1/true/false, got {raw!r}")


def _parse(default: Any, raw: str, source: str) -> Any:
    kind = type(default)
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
            raise argparse.ArgumentTypeError(
                f"{flag} must be {kind.__name__}, got {raw!r}"
            ) from None

    convert.__name__ = kind.__name__
    return convert


def _parse_bool_flag(flag: str):
    def convert(raw: str) -> bool:
        try:
            return _parse_bool(raw, flag)
        except ConfigError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return convert
