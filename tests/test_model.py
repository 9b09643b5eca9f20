"""The shipped models (64 and 128 experts, top-8): each loads offline in transformers, our
forward equals transformers', and each has learned the held-out text far beyond a unigram."""

import json
import math
import os

import pytest
import torch

from lynx_sglang import SHIPPED_MODEL_E128, SHIPPED_MODELS
from lynx_sglang.model.qwen3_moe import MoEModel, route, unigram_cross_entropy

os.environ.setdefault("HF_HUB_OFFLINE", "1")
BRIEF = {  # model -> (experts, top-k, size limit in bytes)
    SHIPPED_MODELS[0]: (64, 8, 60 * 2**20),
    SHIPPED_MODEL_E128: (128, 8, 16 * 2**20),  # small enough that the tree travels to a GPU
}


@pytest.fixture(scope="module", params=SHIPPED_MODELS, ids=lambda p: p.name)
def model_dir(request):
    if not (request.param / "model.safetensors").exists():
        pytest.skip(f"{request.param.name} not trained yet")
    return request.param


@pytest.fixture(scope="module")
def heldout_ids(model_dir):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    return torch.tensor(tok.encode((model_dir / "heldout.txt").read_text()).ids)


@pytest.fixture(scope="module")
def ours(model_dir):
    return MoEModel.from_pretrained(model_dir)


def test_shipped_model_meets_the_brief(model_dir):
    cfg = json.loads((model_dir / "config.json").read_text())
    experts, top_k, limit = BRIEF[model_dir]
    assert cfg["architectures"] == ["Qwen3MoeForCausalLM"]
    assert (cfg["num_experts"], cfg["num_experts_per_tok"]) == (experts, top_k)
    size = sum(p.stat().st_size for p in model_dir.iterdir())
    assert size <= limit


def test_transformers_loads_it_offline_and_logits_match_ours(model_dir, ours, heldout_ids):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    assert tok.decode(tok("def f(x):\n    return x\n").input_ids) == "def f(x):\n    return x\n"
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    x = heldout_ids[:256].view(2, 128)
    with torch.no_grad():
        a = hf(x).logits
        b = ours(x).logits
    assert type(hf).__name__ == "Qwen3MoeForCausalLM"
    torch.testing.assert_close(b, a, atol=2e-4, rtol=2e-4)


def test_heldout_perplexity_is_far_below_a_unigram_model(ours, heldout_ids):
    seq = 256
    n = min(heldout_ids.numel() // seq, 16)
    x = heldout_ids[: n * seq].view(n, seq)
    with torch.no_grad():
        logits = ours(x).logits[:, :-1]
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
    ppl = math.exp(float(nll))
    # The unigram is fitted on the very text it is scored on: a strictly easier baseline.
    uni = math.exp(unigram_cross_entropy(x, x[:, 1:], ours.config.vocab_size))
    assert ppl < uni / 5, (ppl, uni)


def test_routing_is_learned_not_uniform(ours, heldout_ids):
    """Top-1 router probability well above uniform: there is confidence for Lynx to use."""
    x = heldout_ids[:512].view(2, 256)
    with torch.no_grad():
        out = ours(x)
    E = ours.config.num_experts
    for logits in out.router_logits:
        p1 = torch.softmax(logits.float(), -1).max(-1).values.mean()
        assert p1 > 3.0 / E
    ids, w = route(out.router_logits[0], ours.config.num_experts_per_tok, True)
    torch.testing.assert_close(w.sum(-1), torch.ones_like(w.sum(-1)))
