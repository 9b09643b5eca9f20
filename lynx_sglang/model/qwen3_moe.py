"""A short Qwen3-MoE implementation in plain torch: training, evaluation and policy insertion.

It reads and writes the Hugging Face checkpoint layout (per-expert ``gate_proj/up_proj/down_proj``),
so what it trains loads in transformers and SGLang as any Qwen3-MoE model, and its logits are
checked equal to transformers' in the tests. A ``RoutingHook`` sees every MoE layer's routing and
may replace it: that is where the quality harness inserts the Lynx policy.

Dimensions: B batch, S sequence, T = B*S tokens, H hidden, E experts, k top-k, I expert width.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

# hook(layer, router_logits [B, S, E], topk_ids [B, S, k], topk_weights [B, S, k]) -> (ids, weights)
RoutingHook = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class MoEModelConfig:
    vocab_size: int = 4096
    hidden_size: int = 192
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 48
    num_experts: int = 64
    num_experts_per_tok: int = 8
    moe_intermediate_size: int = 128
    norm_topk_prob: bool = True
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 1024
    tie_word_embeddings: bool = True
    router_aux_loss_coef: float = 0.01
    bos_token_id: int = 1
    eos_token_id: int = 2

    def to_hf(self) -> dict:
        """The config.json transformers and SGLang read for ``Qwen3MoeForCausalLM``."""
        d = asdict(self)
        d.update(
            architectures=["Qwen3MoeForCausalLM"],
            model_type="qwen3_moe",
            hidden_act="silu",
            intermediate_size=self.moe_intermediate_size * 4,  # dense MLP width (unused: all MoE)
            decoder_sparse_step=1,
            mlp_only_layers=[],
            attention_bias=False,
            attention_dropout=0.0,
            initializer_range=0.02,
            output_router_logits=False,
            use_cache=True,
            use_sliding_window=False,
            sliding_window=None,
            max_window_layers=self.num_hidden_layers,
            rope_scaling=None,
            torch_dtype="bfloat16",
            dtype="bfloat16",
        )
        return d

    @classmethod
    def from_hf(cls, d: dict) -> MoEModelConfig:
        if d.get("model_type") != "qwen3_moe":
            raise ValueError(f"expected a qwen3_moe config, got model_type={d.get('model_type')!r}")
        names = cls.__dataclass_fields__.keys()
        kw = {k: d[k] for k in names if k in d}
        if "rope_theta" not in d and isinstance(d.get("rope_parameters"), dict):
            kw["rope_theta"] = d["rope_parameters"].get("rope_theta", cls.rope_theta)
        return cls(**kw)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_cos_sin(seq: int, dim: int, theta: float, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim))
    pos = torch.arange(seq, device=device).float()
    freqs = torch.outer(pos, inv)  # [S, D/2]
    emb = torch.cat([freqs, freqs], dim=-1)  # [S, D]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


class Attention(nn.Module):
    def __init__(self, c: MoEModelConfig):
        super().__init__()
        self.nh, self.nkv, self.hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, self.nh * self.hd, bias=False)
        self.k_proj = nn.Linear(c.hidden_size, self.nkv * self.hd, bias=False)
        self.v_proj = nn.Linear(c.hidden_size, self.nkv * self.hd, bias=False)
        self.o_proj = nn.Linear(self.nh * self.hd, c.hidden_size, bias=False)
        self.q_norm = RMSNorm(self.hd, c.rms_norm_eps)
        self.k_norm = RMSNorm(self.hd, c.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, S, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, S, self.nh, self.hd)).transpose(1, 2)  # [B, nh, S, D]
        k = self.k_norm(self.k_proj(x).view(B, S, self.nkv, self.hd)).transpose(1, 2)
        v = self.v_proj(x).view(B, S, self.nkv, self.hd).transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        rep = self.nh // self.nkv
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, nh, S, D]
        return self.o_proj(o.transpose(1, 2).reshape(B, S, self.nh * self.hd))


def route(router_logits: torch.Tensor, k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen3-MoE routing: softmax over experts, top-k, optional renormalisation. -> ids, weights."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    w, ids = torch.topk(probs, k, dim=-1)
    if renormalize:
        w = w / w.sum(dim=-1, keepdim=True)
    return ids, w


def experts_forward(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """All experts of a layer: assignments sorted by expert, one matmul pair per used expert.

    Differentiable; exact FLOPs (no capacity padding), which is what makes CPU training fast.
    x: [N, H], w13: [E, 2I, H], w2: [E, H, I], ids/weights: [N, k] -> [N, H]
    """
    N, H = x.shape
    E, k, inter = w13.shape[0], ids.shape[1], w2.shape[2]
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)  # assignments grouped by expert
    counts = torch.bincount(flat, minlength=E).tolist()
    tok = order // k
    w13s, w2s = w13.unbind(0), w2.unbind(0)  # one stacked gradient instead of E sliced ones
    outs = []
    for e, xe in enumerate(torch.split(x[tok], counts)):  # xe: [n_e, H]
        if xe.shape[0]:
            h = xe @ w13s[e].t()  # [n_e, 2I]
            outs.append((F.silu(h[:, :inter]) * h[:, inter:]) @ w2s[e].t())
    y = torch.cat(outs)  # [N*k, H] in expert order
    contrib = y * weights.reshape(-1)[order, None].to(y.dtype)
    return x.new_zeros(N, H).index_add_(0, tok, contrib)


class SparseMoE(nn.Module):
    def __init__(self, c: MoEModelConfig):
        super().__init__()
        self.k, self.renorm, self.E = c.num_experts_per_tok, c.norm_topk_prob, c.num_experts
        H, inter = c.hidden_size, c.moe_intermediate_size
        self.gate = nn.Linear(H, c.num_experts, bias=False)
        self.w13 = nn.Parameter(torch.randn(c.num_experts, 2 * inter, H) * 0.02)  # [E, 2I, H]
        self.w2 = nn.Parameter(torch.randn(c.num_experts, H, inter) * 0.02)  # [E, H, I]

    def forward(self, x: torch.Tensor, layer: int, hook: Optional[RoutingHook]):
        B, S, H = x.shape
        logits = self.gate(x)  # [B, S, E]
        ids, w = route(logits, self.k, self.renorm)
        if hook is not None:
            ids, w = hook(layer, logits, ids, w)
        out = experts_forward(x.reshape(-1, H), self.w13, self.w2, ids.reshape(-1, self.k),
                              w.reshape(-1, self.k))
        return out.view(B, S, H), logits, ids


class DecoderLayer(nn.Module):
    def __init__(self, c: MoEModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = SparseMoE(c)


@dataclass
class ForwardOutput:
    logits: torch.Tensor  # [B, S, V]
    router_logits: list[torch.Tensor]  # per layer [B, S, E]
    topk_ids: list[torch.Tensor]  # per layer [B, S, k] (after the hook)
    aux_loss: torch.Tensor


class MoEModel(nn.Module):
    """Qwen3-MoE causal LM. ``forward(ids, hook)`` runs the whole sequence (causal)."""

    def __init__(self, c: MoEModelConfig):
        super().__init__()
        self.config = c
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        nn.init.normal_(self.embed_tokens.weight, std=0.02)
        self.layers = nn.ModuleList(DecoderLayer(c) for _ in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.lm_head = None if c.tie_word_embeddings else nn.Linear(c.hidden_size, c.vocab_size, bias=False)

    def forward(self, input_ids: torch.Tensor, hook: Optional[RoutingHook] = None) -> ForwardOutput:
        c = self.config
        x = self.embed_tokens(input_ids)  # [B, S, H]
        cos, sin = rope_cos_sin(input_ids.shape[1], c.head_dim, c.rope_theta, x.device, x.dtype)
        all_logits, all_ids = [], []
        aux = x.new_zeros((), dtype=torch.float32)
        for i, layer in enumerate(self.layers):
            x = x + layer.self_attn(layer.input_layernorm(x), cos, sin)
            y, rl, ids = layer.mlp(layer.post_attention_layernorm(x), i, hook)
            x = x + y
            all_logits.append(rl)
            all_ids.append(ids)
            aux = aux + load_balance_loss(rl, ids, c.num_experts)
        x = self.norm(x)
        head = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return ForwardOutput(x @ head.t(), all_logits, all_ids, aux / len(self.layers))

    # ---- Hugging Face checkpoint layout ----
    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        c, sd = self.config, {}
        sd["model.embed_tokens.weight"] = self.embed_tokens.weight
        sd["model.norm.weight"] = self.norm.weight
        if self.lm_head is not None:
            sd["lm_head.weight"] = self.lm_head.weight
        inter = c.moe_intermediate_size
        for i, L in enumerate(self.layers):
            p = f"model.layers.{i}."
            sd[p + "input_layernorm.weight"] = L.input_layernorm.weight
            sd[p + "post_attention_layernorm.weight"] = L.post_attention_layernorm.weight
            for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
                sd[p + f"self_attn.{n}.weight"] = getattr(L.self_attn, n).weight
            sd[p + "self_attn.q_norm.weight"] = L.self_attn.q_norm.weight
            sd[p + "self_attn.k_norm.weight"] = L.self_attn.k_norm.weight
            sd[p + "mlp.gate.weight"] = L.mlp.gate.weight
            for e in range(c.num_experts):
                q = p + f"mlp.experts.{e}."
                sd[q + "gate_proj.weight"] = L.mlp.w13[e, :inter]
                sd[q + "up_proj.weight"] = L.mlp.w13[e, inter:]
                sd[q + "down_proj.weight"] = L.mlp.w2[e]
        return {k: v.detach().contiguous() for k, v in sd.items()}

    def load_hf_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        c, inter = self.config, self.config.moe_intermediate_size
        with torch.no_grad():
            self.embed_tokens.weight.copy_(sd["model.embed_tokens.weight"])
            self.norm.weight.copy_(sd["model.norm.weight"])
            if self.lm_head is not None:
                self.lm_head.weight.copy_(sd["lm_head.weight"])
            for i, L in enumerate(self.layers):
                p = f"model.layers.{i}."
                L.input_layernorm.weight.copy_(sd[p + "input_layernorm.weight"])
                L.post_attention_layernorm.weight.copy_(sd[p + "post_attention_layernorm.weight"])
                for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
                    getattr(L.self_attn, n).weight.copy_(sd[p + f"self_attn.{n}.weight"])
                L.self_attn.q_norm.weight.copy_(sd[p + "self_attn.q_norm.weight"])
                L.self_attn.k_norm.weight.copy_(sd[p + "self_attn.k_norm.weight"])
                L.mlp.gate.weight.copy_(sd[p + "mlp.gate.weight"])
                for e in range(c.num_experts):
                    q = p + f"mlp.experts.{e}."
                    L.mlp.w13[e, :inter].copy_(sd[q + "gate_proj.weight"])
                    L.mlp.w13[e, inter:].copy_(sd[q + "up_proj.weight"])
                    L.mlp.w2[e].copy_(sd[q + "down_proj.weight"])

    def save_pretrained(self, path: str | Path, dtype: torch.dtype = torch.bfloat16) -> None:
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        sd = {k: v.to(dtype) for k, v in self.hf_state_dict().items()}
        if self.config.tie_word_embeddings:
            sd.pop("lm_head.weight", None)
        save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})
        (path / "config.json").write_text(json.dumps(self.config.to_hf(), indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32) -> MoEModel:
        from safetensors.torch import load_file

        path = Path(path)
        cfg = MoEModelConfig.from_hf(json.loads((path / "config.json").read_text()))
        model = cls(cfg)
        model.load_hf_state_dict(load_file(str(path / "model.safetensors")))
        return model.to(dtype).eval()

    def expert_weights(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(gate [E, H], w13 [E, 2I, H], w2 [E, H, I]) of one MoE layer, for cache/bench code."""
        m = self.layers[layer].mlp
        return m.gate.weight.detach(), m.w13.detach(), m.w2.detach()


def load_balance_loss(router_logits: torch.Tensor, ids: torch.Tensor, E: int) -> torch.Tensor:
    """Switch-style auxiliary loss E * sum_e f_e * P_e (1.0 when perfectly balanced)."""
    probs = torch.softmax(router_logits.float().reshape(-1, E), dim=-1)
    f = torch.bincount(ids.reshape(-1), minlength=E).float() / ids.numel()
    return E * (f * probs.mean(0)).sum()


def unigram_cross_entropy(train_ids: torch.Tensor, eval_ids: torch.Tensor, vocab: int) -> float:
    """Cross-entropy (nats/token) of an add-one unigram model fitted on train_ids, on eval_ids."""
    counts = torch.bincount(train_ids.reshape(-1), minlength=vocab).double() + 1.0
    logp = torch.log(counts / counts.sum())
    return float(-logp[eval_ids.reshape(-1)].mean())
