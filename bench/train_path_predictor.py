"""Train the learned routing-path predictor that ``--lynx-eviction path`` can read.

ExpertFlow forecasts each token's routing path with a small learned predictor. Ours forecasts,
per MoE layer, a running request's next-token experts from its latest token: the path history's
estimate p (the decayed histogram ``RequestHistory`` keeps), the router's softmax, the experts
it chose and the layer's MoE input x (``lynx_sglang.offload.path.PathPredictor``: one logistic
map per layer, [E, 3E + H]; ``--no-hidden`` leaves x out). x lifts the held-out recall@8 by
0.02-0.07 per layer over the [E, 3E] map on the tiny model.

Train and evaluation split: the predictor is trained on the routing of requests cut from the
model's **training split** (the standard library's code, without ``pydoc_data``, whose text is
the serving replay's docs task), with 20 % of those requests held out for the check printed
here; the serving replay (``bench.serve_replay``) evaluates it on held-out code, never-trained
prose and the docs, none of which it saw. It starts from the path history itself (weight 1 on
logit(p), so an untrained predictor is the histogram) and is pulled back to it by its L2 term.

    python -m bench.train_path_predictor                      # tiny model, ~4 min on one core
    python -m bench.train_path_predictor --model lynx_sglang/data/lynx-moe-e128

Writes ``<model>/path_predictor.pt`` (a few hundred KB) and prints a table and a JSON line.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from bench import serve_replay as sr
from lynx_sglang import SHIPPED_MODEL
from lynx_sglang.model.corpus import split_corpus
from lynx_sglang.model.qwen3_moe import MoEModel
from lynx_sglang.offload.path import PREDICTOR_FILE, PathPredictor


def training_text() -> str:
    """The model's training split without ``pydoc_data`` (the replay's docs task)."""
    return split_corpus(skip=("pydoc_data",))[0]


def training_requests(model_dir: Path, n: int, seed: int) -> list[sr.Request]:
    """``n`` requests cut from the training split at random, lengths as the replay draws them."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    text = training_text()
    rng = np.random.default_rng(seed)
    P = sr.lognormal_lengths(rng, n, 96, 8, 256)
    out = sr.lognormal_lengths(rng, n, 48, 2, 160)
    starts = rng.integers(0, len(text) - 8 * 512, n)
    reqs = []
    for i in range(n):
        ids = tok.encode(text[starts[i] : starts[i] + 8 * 512]).ids  # ~4 chars per token
        m = int(min(P[i] + out[i], len(ids)))
        prompt = int(min(P[i], m - 2))
        reqs.append(sr.Request(i, "train", torch.tensor(ids[:m]), prompt, m - prompt))
    return reqs


def request_features(ids: torch.Tensor, logits: torch.Tensor, prompt: int, output: int,
                     decay: float, num_experts: int, horizon: int = 1,
                     hidden: torch.Tensor | None = None):  # fmt: skip
    """One request's training rows at one layer, as ``RequestHistory`` sees them in a server:
    ids [S, k], logits [S, E] and MoE inputs ``hidden`` [S, H] of its tokens. Row j predicts
    decode position P + j from the state after the previous position (the prefill's last row for
    j = 0); its target is each expert's use within the request's next ``horizon`` decode tokens.
    Returns (p, probs, chosen, x, target): [O - 1, E] each, x [O - 1, H] (None without hidden)."""
    E, P, n = num_experts, prompt, output - 1
    onehot = torch.zeros(ids.shape[0], E).scatter_(1, ids.long(), 1.0)
    probs = torch.softmax(logits.float(), dim=-1)
    p = torch.empty(n, E)
    h = onehot[:P].mean(0) / (1.0 - decay)  # the prefill's seed
    for j in range(n):
        p[j] = (1.0 - decay) * h
        h = decay * h + onehot[P + j]
    rows = torch.arange(P - 1, P - 1 + n)
    target = onehot[P : P + n].clone()
    for ahead in range(1, horizon):  # within the next tokens, up to the request's last decode
        target[: n - ahead] = torch.maximum(target[: n - ahead], onehot[P + ahead : P + n])
    x = hidden[rows].float() if hidden is not None else None
    return p, probs[rows], onehot[rows], x, target


def dataset(W: sr.Workload, decay: float, horizon: int = 1,
            hidden: bool = True) -> list[tuple[torch.Tensor, ...]]:  # fmt: skip
    """Per layer (features [N, 3E + H], target [N, E]) over every request of ``W`` (H = 0
    without ``hidden``)."""
    out = []
    for layer in range(W.num_layers):
        parts = []
        for i, r in enumerate(W.requests):
            if r.output > 1:
                o, S = int(W.offset[i]), len(r.tokens)
                x = W.hidden[layer, o : o + S] if hidden else None
                parts.append(request_features(W.ids[i][layer], W.logits[i][layer], r.prompt,
                                              r.output, decay, W.num_experts, horizon, x))  # fmt: skip
        p, probs, chosen, x, y = (torch.cat(t) if t[0] is not None else None for t in zip(*parts))
        out.append((PathPredictor.features(p, probs, chosen, x), y))
    return out


def recall_at_k(prob: torch.Tensor, target: torch.Tensor, k: int) -> float:
    """Of each row's k true experts, the share among its k most likely (mean over rows)."""
    return float(target.gather(1, prob.topk(k, dim=-1).indices).sum(1).mean()) / k


def bce(prob: torch.Tensor, target: torch.Tensor) -> float:
    prob = prob.clamp(1e-4, 1 - 1e-4)
    return float(-(target * prob.log() + (1 - target) * (1 - prob).log()).sum(1).mean())


def fit(x: torch.Tensor, y: torch.Tensor, E: int, steps: int, lr: float, l2: float):
    """One layer's logistic map, from the path history (weight 1 on logit(p)), L2 toward it."""
    w0 = torch.zeros(E, x.shape[1])
    w0[:, :E] = torch.eye(E)
    w = w0.clone().requires_grad_(True)
    b = torch.zeros(E, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=lr)
    for _ in range(steps):
        z = torch.addmm(b, x, w.t())
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z, y, reduction="sum") / len(x)
        loss = loss + l2 * (w - w0).pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return w.detach(), b.detach()


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(SHIPPED_MODEL))
    ap.add_argument("--requests", type=int, default=768, help="training-split requests routed")
    ap.add_argument("--decay", type=float, default=0.95, help="the history's --lynx-path-decay")
    ap.add_argument(
        "--horizon",
        type=int,
        default=1,
        help="target: an expert's use within the request's next H decode tokens",
    )
    ap.add_argument(
        "--no-hidden",
        action="store_true",
        help="leave out the MoE input x (a [E, 3E] map: history, softmax, choices)",
    )
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--l2", type=float, default=1e-4, help="pull toward the path history")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="", help=f"default: <model>/{PREDICTOR_FILE}")
    args = ap.parse_args(argv)
    t0 = time.time()
    torch.manual_seed(args.seed)
    model_dir = Path(args.model)
    model = MoEModel.from_pretrained(model_dir)
    c = model.config
    L, E, k = c.num_hidden_layers, c.num_experts, c.num_experts_per_tok
    reqs = training_requests(model_dir, args.requests, args.seed)
    cut = int(0.8 * len(reqs))
    t1 = time.time()
    hidden = not args.no_hidden
    train = dataset(sr.route(model, reqs[:cut]), args.decay, args.horizon, hidden)
    check = dataset(sr.route(model, reqs[cut:]), args.decay, 1, hidden)  # the next token
    print(f"routed in {time.time() - t1:.0f} s")
    F = train[0][0].shape[1]  # 3E + H
    weight, bias, layers = torch.zeros(L, E, F), torch.zeros(L, E), []
    print(f"train_path_predictor: {model_dir.name} (E={E}, top-{k}, {L} layers), {cut} training "
          f"requests, {len(reqs) - cut} held out; {len(train[0][0])} / {len(check[0][0])} "
          "decode rows per layer")  # fmt: skip
    print("| layer | held-out recall@k: path history | learned | held-out BCE: path | learned |")
    print("|---|---|---|---|---|")
    for layer in range(L):
        (x, y), (xc, yc) = train[layer], check[layer]
        weight[layer], bias[layer] = fit(x, y, E, args.steps, args.lr, args.l2)
        pred = PathPredictor(weight[layer : layer + 1], bias[layer : layer + 1], args.decay)
        with torch.no_grad():
            q = torch.sigmoid(torch.addmm(pred.bias[0], xc, pred.weight[0].t()))
        p = xc[:, :E].sigmoid()  # the history's own estimate (logit(p) clamped)
        row = {"layer": layer, "recall_path": recall_at_k(p, yc, k),
               "recall_learned": recall_at_k(q, yc, k), "bce_path": bce(p, yc),
               "bce_learned": bce(q, yc)}  # fmt: skip
        layers.append(row)
        print(f"| {layer} | {row['recall_path']:.3f} | {row['recall_learned']:.3f} | "
              f"{row['bce_path']:.2f} | {row['bce_learned']:.2f} |")  # fmt: skip
    meta = {"model": model_dir.name, "train_requests": cut, "check_requests": len(reqs) - cut,
            "train_rows_per_layer": len(train[0][0]), "seed": args.seed, "steps": args.steps,
            "l2": args.l2, "horizon": args.horizon, "hidden_size": F - 3 * E, "split": "stdlib training split without pydoc_data", "layers": layers}  # fmt: skip
    out = Path(args.out or model_dir / PREDICTOR_FILE)
    PathPredictor(weight, bias, args.decay, meta).save(out)
    result = {"model": model_dir.name, "out": str(out), "bytes": out.stat().st_size,
              "seconds": round(time.time() - t0, 1),
              "recall_path": [round(r["recall_path"], 3) for r in layers],
              "recall_learned": [round(r["recall_learned"], 3) for r in layers]}  # fmt: skip
    print(f"wrote {out} ({result['bytes'] / 1e3:.0f} KB) in {result['seconds']} s")
    print(json.dumps(result, separators=(",", ":")))
    return result


if __name__ == "__main__":
    main()
