"""Quality cost of batch-aware expert selection on the shipped model, as batched decode.

    python -m bench.quality [--quick] [--batch 16] [--budgets 1,0.8,0.6,0.5,0.4]

B held-out sequences advance together: the first `--prefill` positions are prefill (untouched),
every later position is one decode step whose B tokens form the batch the policy sees
(teacher-forced). Because attention is causal, running the whole sequence at once with the
policy applied per position group equals stepping the decode one token at a time, so this is
exactly what a server computing this batch would produce, and fast.

Reports per setting: distinct experts per layer per decode step (mean), held-out perplexity on
decode positions (Δppl), top-1 accuracy against the true next token (Δ in points: the task-
accuracy analogue for a language model), the mean KL divergence from the unmodified model's
next-token distribution, and greedy agreement with the unmodified model (reported, not a goal:
numerics alone move it). Each is shown beside its bf16 numerics floor (the unmodified model in
bf16 against fp32). Last line: JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import torch

from lynx_sglang import SHIPPED_MODEL
from lynx_sglang.model.qwen3_moe import MoEModel
from lynx_sglang.selection.policy import SelectionParams, distinct_experts, select_experts_ref

DEFAULT = SelectionParams()  # the recommended setting (LynxConfig defaults)


PROSE = SHIPPED_MODEL.parent / "prose_ood.txt"  # English prose no model trained on
TEXTS = ("code", "prose")


def load_heldout_ids(model_dir: Path, text: str = "code") -> torch.Tensor:
    """Token ids of the evaluation text: the model's held-out code (in-domain, its
    ``heldout.txt``) or the shipped out-of-domain English prose (``data/prose_ood.txt``)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    path = model_dir / "heldout.txt" if text == "code" else PROSE
    return torch.tensor(tok.encode(path.read_text()).ids, dtype=torch.long)


def make_batches(ids: torch.Tensor, batch: int, seq: int, max_batches: int) -> list[torch.Tensor]:
    """Consecutive, non-overlapping [batch, seq] windows of the held-out token stream."""
    n = ids.numel() // seq
    rows = ids[: n * seq].view(n, seq)
    out = [rows[i : i + batch] for i in range(0, n - batch + 1, batch)]
    return out[:max_batches]


class DecodePolicyHook:
    """Applies the policy to each decode position's B tokens; records distinct-expert counts."""

    def __init__(self, params: Optional[SelectionParams], prefill: int, num_experts: int,
                 resident: Optional[torch.Tensor] = None):
        # resident: [D, L, E] bool, the experts on the GPU at each decode step and layer (for
        # cache-aware selection, as recorded by a cache replay); None: selection sees no cache.
        self.params, self.prefill, self.E, self.resident = params, prefill, num_experts, resident
        self.distinct: list[torch.Tensor] = []  # per layer: [D] distinct experts per decode step
        self.trace: list[torch.Tensor] = []  # per layer: [D, B, k] decode routing after the policy

    def __call__(self, layer, logits, ids, weights):
        P = self.prefill
        # [B, S, .] -> decode part grouped by step: [D, B, .]
        dl, di, dw = (t[:, P:].transpose(0, 1) for t in (logits, ids, weights))
        if self.params is not None:
            res_mask = None if self.resident is None else self.resident[:, layer]  # [D, E]
            res = select_experts_ref(dl, di, dw, self.params, resident=res_mask)
            di, dw = res.topk_ids, res.topk_weights
            ids = torch.cat([ids[:, :P], di.transpose(0, 1)], dim=1)
            weights = torch.cat([weights[:, :P], dw.transpose(0, 1)], dim=1)
        self.distinct.append(distinct_experts(di, self.E).float())
        self.trace.append(di)
        return ids, weights


@dataclass
class Result:
    name: str
    distinct: float
    nll_sum: float
    count: int
    agree: int
    correct: int = 0  # top-1 predictions equal to the true next token
    kl_sum: float = 0.0  # sum over positions of KL(base || this setting), nats

    @property
    def ppl(self) -> float:
        return math.exp(self.nll_sum / max(self.count, 1))

    @property
    def accuracy(self) -> float:
        return self.correct / max(self.count, 1)

    @property
    def kl(self) -> float:
        return self.kl_sum / max(self.count, 1)


def run_setting(model, batches, prefill, params, base_argmax=None, keep_trace=False,
                residents=None, base_logp=None, keep_logp=False):
    """Forward every batch with the policy; returns (Result, argmax per batch, traces).

    residents: per batch, [D, L, E] resident masks for cache-aware selection (or None).
    base_logp: per batch, the unmodified model's next-token log-probabilities (for the KL);
    keep_logp: return this run's instead of its argmaxes (the base run, for the others)."""
    E = model.config.num_experts
    nll, cnt, agree, dsum, dn, correct, kl = 0.0, 0, 0, 0.0, 0, 0, 0.0
    argmaxes, traces = [], []
    for b, x in enumerate(batches):
        hook = DecodePolicyHook(params, prefill, E, None if residents is None else residents[b])
        with torch.no_grad():
            logits = model(x, hook=hook).logits[:, prefill:-1]  # predicts x[:, prefill+1:]
        tgt = x[:, prefill + 1 :]
        nll += float(torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), tgt.reshape(-1), reduction="sum"))
        cnt += tgt.numel()
        am = logits.argmax(-1)
        correct += int((am == tgt).sum())
        logp = torch.log_softmax(logits.float(), -1)  # [B, D, V]
        if base_logp is not None:
            ref = base_logp[b].float()
            kl += float((ref.exp() * (ref - logp)).sum())
        argmaxes.append((am, logp.to(torch.bfloat16)) if keep_logp else am)
        if base_argmax is not None:
            agree += int((am == base_argmax[b]).sum())
        d = torch.stack(hook.distinct)  # [L, D]
        dsum += float(d[:, :-1].sum())
        dn += d[:, :-1].numel()
        if keep_trace:
            traces.append(torch.stack(hook.trace, dim=1))  # [D, L, B, k]
    name = "base" if params is None else describe(params)
    return Result(name, dsum / max(dn, 1), nll, cnt, agree, correct, kl), argmaxes, traces


def describe(p: SelectionParams) -> str:
    if p.policy == "oea":
        return f"oea k0={p.protect_top}"
    s = f"lynx b={p.budget:g}"
    if p.max_experts:
        s += f" cap={p.max_experts}"
    if p.protect_top != 1:
        s += f" top={p.protect_top}"
    if p.protect_p:
        s += f" p={p.protect_p:g}"
    return s


def numerics_floor(model, batches, prefill, base_argmax, base_logp=None) -> Result:
    """The unmodified model in bf16 against fp32: what numerics alone move each metric.

    Servers run bf16, so this is the noise floor every column should be read against.
    """
    half = copy.deepcopy(model).to(torch.bfloat16)
    r, _, _ = run_setting(half, batches, prefill, None, base_argmax, base_logp=base_logp)
    r.name = "base in bf16 (floor)"
    return r


def evaluate(model, batches, prefill, settings: list[SelectionParams], keep_trace=False,
             floor: bool = False):
    """Base plus each setting; returns (base Result, [Result], base traces, traces per setting).

    With ``floor``, the first row is the bf16 numerics floor (see ``numerics_floor``).
    """
    base, kept, base_tr = run_setting(model, batches, prefill, None, keep_trace=keep_trace,
                                      keep_logp=True)
    base_am, base_logp = [am for am, _ in kept], [lp for _, lp in kept]
    base.agree = base.count
    rows, trs = [], []
    if floor:
        rows.append(numerics_floor(model, batches, prefill, base_am, base_logp))
        trs.append([])
    for p in settings:
        r, _, tr = run_setting(model, batches, prefill, p, base_am, keep_trace=keep_trace,
                               base_logp=base_logp)
        rows.append(r)
        trs.append(tr)
    return base, rows, base_tr, trs


def print_table(batch: int, base: Result, rows: list[Result]) -> None:
    hdr = (f"{'setting':<22}{'distinct':>9}{'reduction':>10}{'ppl':>9}{'Δppl %':>8}"
           f"{'acc %':>7}{'Δacc pt':>8}{'KL':>8}{'agree':>7}")
    print(f"batch {batch}: {base.count} decode tokens (the bf16 row is the numerics floor)")
    print(hdr)
    print("-" * len(hdr))
    for r in [base] + rows:
        red = 1 - r.distinct / base.distinct
        dp = 100 * (r.ppl / base.ppl - 1)
        da = 100 * (r.accuracy - base.accuracy)
        print(f"{r.name[:22]:<22}{r.distinct:>9.2f}{red:>10.3f}{r.ppl:>9.3f}{dp:>+8.2f}"
              f"{100 * r.accuracy:>7.2f}{da:>+8.2f}{r.kl:>8.4f}{r.agree / r.count:>7.3f}")


def default_settings(budgets: list[float]) -> list[SelectionParams]:
    out = [replace(DEFAULT, budget=b) for b in budgets]
    out.append(replace(DEFAULT, policy="oea", protect_top=2))
    out.append(replace(DEFAULT, policy="oea", protect_top=4))
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(SHIPPED_MODEL))
    ap.add_argument("--quick", action="store_true", help="a small slice: under a minute on 2 cores")
    ap.add_argument("--text", choices=TEXTS, default="code",
                    help="held-out code (in-domain) or out-of-domain English prose")
    ap.add_argument("--batch", type=int, nargs="+", default=[16])
    ap.add_argument("--prefill", type=int, default=64)
    ap.add_argument("--decode", type=int, default=192)
    ap.add_argument("--max-batches", type=int, default=0, help="per batch size (0: all held-out text)")
    ap.add_argument("--budgets", default="0.8,0.7,0.6,0.5,0.4")
    ap.add_argument("--max-experts", type=int, default=0,
                    help="cap every setting's kept set (e.g. K: a hybrid cache's capture bound)")
    ap.add_argument("--json-out", default="", help="also write the JSON here")
    ap.add_argument("--save-traces", default="", help="write decode routing traces (base and default) here")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    t0 = time.time()
    model_dir = Path(args.model)
    model = MoEModel.from_pretrained(model_dir)
    ids = load_heldout_ids(model_dir, args.text)
    if args.quick:
        args.prefill, args.decode = 32, 96
        args.max_batches = args.max_batches or 2
    budgets = [float(b) for b in args.budgets.split(",") if b]
    settings = default_settings(budgets)
    if args.max_experts:
        settings = [replace(p, max_experts=args.max_experts) for p in settings]
    summary = {}
    for B in args.batch:
        batches = make_batches(ids, B, args.prefill + args.decode, args.max_batches or 10**9)
        if not batches:
            raise SystemExit(f"held-out text too short for batch {B} x seq {args.prefill + args.decode}")
        base, rows, base_tr, trs = evaluate(model, batches, args.prefill, settings,
                                            keep_trace=bool(args.save_traces), floor=True)
        print_table(B, base, rows)
        floor_row, rows, trs = rows[0], rows[1:], trs[1:]
        d = rows[budgets.index(DEFAULT.budget)] if DEFAULT.budget in budgets else rows[0]
        summary[B] = {
            "batch": B,
            "setting": d.name,
            "distinct_experts_base": round(base.distinct, 3),
            "distinct_experts_lynx": round(d.distinct, 3),
            "expert_reduction": round(1 - d.distinct / base.distinct, 4),
            "ppl_base": round(base.ppl, 4),
            "ppl_lynx": round(d.ppl, 4),
            "ppl_rel_increase": round(d.ppl / base.ppl - 1, 5),
            "agreement": round(d.agree / d.count, 5),
            "accuracy_base": round(base.accuracy, 5),
            "accuracy_delta_points": round(100 * (d.accuracy - base.accuracy), 3),
            "kl": round(d.kl, 6),
            "decode_tokens": base.count,
            "agreement_bf16_floor": round(floor_row.agree / floor_row.count, 5),
            "ppl_rel_increase_bf16_floor": round(floor_row.ppl / base.ppl - 1, 5),
            "accuracy_delta_points_bf16_floor": round(100 * (floor_row.accuracy - base.accuracy), 3),
            "kl_bf16_floor": round(floor_row.kl, 6),
            "curve": [
                {"setting": r.name, "distinct": round(r.distinct, 3),
                 "expert_reduction": round(1 - r.distinct / base.distinct, 4),
                 "ppl": round(r.ppl, 4), "ppl_rel_increase": round(r.ppl / base.ppl - 1, 5),
                 "accuracy_delta_points": round(100 * (r.accuracy - base.accuracy), 3),
                 "kl": round(r.kl, 6), "agreement": round(r.agree / r.count, 5)}
                for r in rows
            ],
        }
        if args.save_traces:
            di = budgets.index(DEFAULT.budget) if DEFAULT.budget in budgets else 0
            path = Path(args.save_traces)
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save({
                "topk_ids": torch.cat(base_tr).to(torch.int16),  # [steps, L, B, k]
                "topk_ids_lynx": torch.cat(trs[di]).to(torch.int16),
                "num_experts": model.config.num_experts, "batch": B, "setting": d.name,
                "source": f"{model_dir.name} held-out decode, teacher-forced",
            }, path.with_name(path.stem + f"_b{B}" + path.suffix))
    out = dict(summary[args.batch[0]])
    out["model"], out["text"] = model_dir.name, args.text
    out["by_batch"] = {str(b): {k: v for k, v in s.items() if k != "curve"} for b, s in summary.items()}
    out["seconds"] = round(time.time() - t0, 1)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
