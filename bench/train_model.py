"""Train the shipped models: small Qwen3-MoEs on the Python standard library's source.

    python -m bench.train_model --out lynx_sglang/data/lynx-moe-tiny --minutes 25
    python -m bench.train_model --out lynx_sglang/data/lynx-moe-e128 --minutes 55 --threads 1 \
        --hidden 128 --experts 128 --expert-width 24 --aux-coef 0.001 --balance global

Steps: split the corpus (fixed, path-hashed), train a byte-level BPE tokenizer with `tokenizers`,
train the model with a router load-balancing loss (AdamW, warm-up + cosine by wall-clock
progress so it fits a time budget on 2 CPU cores), then write config.json, model.safetensors
(bf16), the tokenizer files and heldout.txt. Prints a progress bar and a final JSON line.

Balancing: ``--balance batch`` is the Switch loss E * sum_e f_e * P_e on each batch;
``--balance global`` takes the expert frequencies f_e over the last ``--balance-window`` batches
(Qwen3's global-batch balancing: a larger, more varied token set balances the load without
forcing every batch to spread, which leaves experts room to specialise), with P_e from the
batch itself, so the gradient is the same kind of push, against load seen over a long window.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections import deque
from pathlib import Path

import torch
from tqdm import tqdm

from bench.routing_stats import distinct_per_step
from lynx_sglang.model.corpus import split_corpus, split_readmes
from lynx_sglang.model.qwen3_moe import MoEModel, MoEModelConfig, unigram_cross_entropy

SPECIAL = ["<unk>", "<s>", "</s>", "<pad>"]


def train_tokenizer(text: str, vocab_size: int, out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from tokenizers.processors import ByteLevel as ByteLevelProcessor

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = ByteLevelProcessor(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    chunks = [text[i : i + 100_000] for i in range(0, len(text), 100_000)]
    tok.train_from_iterator(chunks, trainer=trainer)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "pad_token": "<pad>",
                "model_max_length": 1024,
                "add_bos_token": False,
                "clean_up_tokenization_spaces": False,
            },
            indent=2,
        )
        + "\n"
    )
    (out / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"})
        + "\n"
    )
    return tok


def encode(tok, text: str) -> torch.Tensor:
    chunks = [text[i : i + 200_000] for i in range(0, len(text), 200_000)]
    ids = []
    for enc in tok.encode_batch(chunks):
        ids.extend(enc.ids)
    return torch.tensor(ids, dtype=torch.long)


class GlobalBalance:
    """Switch-style loss with each layer's expert frequencies f_e over the last ``window`` batches."""

    def __init__(self, layers: int, experts: int, window: int):
        self.E = experts
        self.counts = [deque(maxlen=window) for _ in range(layers)]

    def __call__(self, router_logits: list[torch.Tensor], topk_ids: list[torch.Tensor]) -> torch.Tensor:
        total = router_logits[0].new_zeros((), dtype=torch.float32)
        for hist, logits, ids in zip(self.counts, router_logits, topk_ids):
            hist.append(torch.bincount(ids.reshape(-1), minlength=self.E).float())
            f = torch.stack(tuple(hist)).sum(0)
            f = f / f.sum()  # [E], no gradient: counts of the recent window
            p = torch.softmax(logits.float().reshape(-1, self.E), dim=-1).mean(0)  # [E]
            total = total + self.E * (f * p).sum()
        return total / len(self.counts)


def lr_at(progress: float, peak: float, warmup: float = 0.03) -> float:
    if progress < warmup:
        return peak * progress / warmup
    p = min(1.0, (progress - warmup) / (1 - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


@torch.no_grad()
def evaluate(model: MoEModel, data: torch.Tensor, seq: int, batch: int, max_batches: int) -> float:
    model.eval()
    n = (data.numel() - 1) // seq
    tot, cnt = 0.0, 0
    for b in range(0, min(n, batch * max_batches), batch):
        idx = torch.arange(b, min(b + batch, n))
        x = torch.stack([data[i * seq : i * seq + seq] for i in idx])
        y = torch.stack([data[i * seq + 1 : i * seq + seq + 1] for i in idx])
        logits = model(x).logits
        tot += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum"))
        cnt += y.numel()
    model.train()
    return tot / max(cnt, 1)


@torch.no_grad()
def distinct_experts_at_batch(model: MoEModel, data: torch.Tensor, seq: int, batch: int) -> float:
    """Mean distinct experts per layer over the tokens of one position of ``batch`` held-out
    sequences: what one decode step of that batch touches (teacher-forced)."""
    model.eval()
    x = data[: batch * seq].view(batch, seq)
    ids = torch.stack(model(x).topk_ids)[None]  # [1, L, B, S, k]
    model.train()
    return distinct_per_step(ids, model.config.num_experts)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="lynx_sglang/data/lynx-moe-tiny")
    ap.add_argument("--minutes", type=float, default=25.0, help="wall-clock training budget")
    ap.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0: time only)")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=192)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--topk", type=int, default=8)
    ap.add_argument("--expert-width", type=int, default=128)
    ap.add_argument("--aux-coef", type=float, default=0.01)
    ap.add_argument("--balance", choices=("batch", "global"), default="batch",
                    help="expert frequencies of the balancing loss: this batch, or a window")
    ap.add_argument("--balance-window", type=int, default=64, help="batches, with --balance global")
    ap.add_argument("--docs-fraction", type=float, default=0.0,
                    help="share of each batch's sequences drawn from the installed packages' read-mes "
                         "(a second domain, lynx_sglang.model.corpus.split_readmes); 0: code only")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--heldout-chars", type=int, default=400_000)
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    t0 = time.time()
    train_text, held_text = split_corpus()
    held_text = held_text[: args.heldout_chars]
    docs_text, _ = split_readmes() if args.docs_fraction > 0 else ("", "")
    tok = train_tokenizer(train_text + "\n\n" + docs_text if docs_text else train_text, args.vocab, out)
    train_ids, held_ids = encode(tok, train_text), encode(tok, held_text)
    docs_ids = encode(tok, docs_text) if docs_text else None
    n_docs = round(args.docs_fraction * args.batch)
    (out / "heldout.txt").write_text(held_text)
    print(f"corpus: train {len(train_text)/1e6:.1f} M chars = {train_ids.numel()/1e6:.2f} M tokens, "
          f"held-out {held_ids.numel()/1e3:.0f} k tokens; tokenizer {time.time()-t0:.0f} s")
    if docs_ids is not None:
        print(f"read-mes: {len(docs_text)/1e6:.1f} M chars = {docs_ids.numel()/1e6:.2f} M tokens, "
              f"{n_docs} of {args.batch} sequences per batch")

    cfg = MoEModelConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=args.hidden, num_hidden_layers=args.layers,
        num_experts=args.experts, num_experts_per_tok=args.topk,
        moe_intermediate_size=args.expert_width, router_aux_loss_coef=args.aux_coef,
        bos_token_id=tok.token_to_id("<s>"), eos_token_id=tok.token_to_id("</s>"),
    )
    model = MoEModel(cfg)
    balance = GlobalBalance(args.layers, args.experts, args.balance_window) if args.balance == "global" else None
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    n_seq = (train_ids.numel() - 1) // args.seq
    n_docs_seq = (docs_ids.numel() - 1) // args.seq if docs_ids is not None else 0
    g = torch.Generator().manual_seed(args.seed)
    budget = args.minutes * 60.0
    start = time.time()
    step, tokens, ema = 0, 0, None
    bar = tqdm(total=100, desc="train", unit="%", bar_format="{l_bar}{bar}| {n:.0f}/{total}% [{elapsed}<{remaining}] {postfix}")
    last_pct = 0.0
    while True:
        progress = (time.time() - start) / budget
        if args.max_steps:
            progress = max(progress, step / args.max_steps)
        if progress >= 1.0:
            break
        for group in opt.param_groups:
            group["lr"] = lr_at(progress, args.lr)
        rows = [(train_ids, s) for s in (torch.randint(0, n_seq, (args.batch - n_docs,), generator=g) * args.seq).tolist()]
        if n_docs:
            rows += [(docs_ids, s) for s in (torch.randint(0, n_docs_seq, (n_docs,), generator=g) * args.seq).tolist()]
        x = torch.stack([ids[s : s + args.seq] for ids, s in rows])
        y = torch.stack([ids[s + 1 : s + args.seq + 1] for ids, s in rows])
        o = model(x)
        ce = torch.nn.functional.cross_entropy(o.logits.reshape(-1, cfg.vocab_size), y.reshape(-1))
        aux = o.aux_loss if balance is None else balance(o.router_logits, o.topk_ids)
        loss = ce + args.aux_coef * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        tokens += x.numel()
        ce_val = float(ce.detach())
        ema = ce_val if ema is None else 0.98 * ema + 0.02 * ce_val
        pct = min(100.0, progress * 100)
        bar.update(pct - last_pct)
        last_pct = pct
        bar.set_postfix_str(f"step {step} loss {ema:.3f} aux {float(aux.detach()):.3f} tok/s {tokens/(time.time()-start):.0f}")
    bar.close()
    train_s = time.time() - start
    held_nll = evaluate(model, held_ids, args.seq, args.batch, max_batches=8)
    uni = unigram_cross_entropy(train_ids, held_ids, cfg.vocab_size)
    distinct = distinct_experts_at_batch(model, held_ids, args.seq, 16)
    model.save_pretrained(out)
    size = (out / "model.safetensors").stat().st_size
    result = {
        "params": n_params, "steps": step, "train_tokens": tokens, "train_seconds": round(train_s),
        "tokens_per_s": round(tokens / train_s), "heldout_ppl": round(math.exp(held_nll), 3),
        "unigram_ppl": round(math.exp(uni), 1),
        "distinct_experts_b16": round(distinct, 1), "safetensors_mb": round(size / 2**20, 1),
        "threads": torch.get_num_threads(), "aux_coef": args.aux_coef, "balance": args.balance,
        "docs_fraction": args.docs_fraction,
        "balance_window": args.balance_window if balance is not None else None, "config": {k: getattr(cfg, k) for k in (
            "vocab_size", "hidden_size", "num_hidden_layers", "num_experts", "num_experts_per_tok",
            "moe_intermediate_size")},
    }
    (out / "training.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
