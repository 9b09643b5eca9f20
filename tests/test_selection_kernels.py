"""The Triton selection kernels against the torch reference: ids and kept sets exactly, weights
and scores to rounding. On CPU they run in Triton's interpreter; `gpu` tests run them compiled."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

# Without CUDA the kernels run in Triton's interpreter, which Triton picks when a function is
# decorated (its own language included, at `import triton`). TRITON_INTERPRET is set for this
# module's import and its tests only, so it does not leak into other modules (where it would
# send `select_experts` on CPU tensors through the interpreter too).
_SET_INTERPRET = not torch.cuda.is_available() and "TRITON_INTERPRET" not in os.environ
if _SET_INTERPRET:
    os.environ["TRITON_INTERPRET"] = "1"
import lynx_sglang.kernels.selection as kernels  # noqa: E402
from lynx_sglang.config import BUDGET_SCALE  # noqa: E402
from lynx_sglang.kernels.selection import interpreted, select_experts_triton  # noqa: E402
from lynx_sglang.selection import SelectionParams, select_experts, select_experts_ref  # noqa: E402
from lynx_sglang.selection.policy import valid_rows  # noqa: E402
from lynx_sglang.selection.types import ExpertSimilarity  # noqa: E402

if _SET_INTERPRET:
    del os.environ["TRITON_INTERPRET"]


@pytest.fixture(autouse=True, scope="module")
def _interpreter_env():
    """Keep TRITON_INTERPRET=1 while this module's tests run (Triton reads it at launch too)."""
    if _SET_INTERPRET:
        os.environ["TRITON_INTERPRET"] = "1"
    yield
    if _SET_INTERPRET:
        os.environ.pop("TRITON_INTERPRET", None)


CPU = pytest.mark.skipif(
    not interpreted(), reason="Triton imported compiled in this process: see the subprocess test"
)

SHAPES = [(1, 8, 2), (7, 32, 4), (16, 64, 8), (33, 128, 8), (64, 60, 4)]  # (T, E, k)
DTYPES = [  # (logits, weights, ids)
    (torch.float32, torch.float32, torch.int64),
    (torch.bfloat16, torch.bfloat16, torch.int32),
    (torch.float16, torch.float32, torch.int32),
]
# The other policies on a base scenario: name -> (base, policy (None: the base's), miss_aware)
VARIANTS = {
    "drop": ("plain", "drop", False),
    "drop_dead": ("dead", "drop", False),
    "drop_cap": ("cap", "drop", False),
    "drop_k1": ("k1", "drop", False),
    "drop_groups": ("groups", "drop", False),
    "drop_protect_p": ("protect_p", "drop", False),
    "drop_tiny": ("tiny_budget", "drop", False),  # rows with no kept choice: as lynx
    "drop_sparse_w": ("sparse_w", "drop", False),  # rows whose kept choices weigh 0: as lynx
    "similar": ("plain", "similar", False),
    "similar_ties": ("ties", "similar", False),  # tied logits and tied similarities
    "similar_flat": ("flat", "similar", False),
    "similar_cap": ("cap", "similar", False),
    "similar_k1": ("k1", "similar", False),
    "similar_groups": ("groups", "similar", False),
    "similar_tiny": ("tiny_budget", "similar", False),
    "similar_critical": ("critical", "similar", False),
    "similar_int_valid": ("int_valid", "similar", False),
    "miss": ("plain", None, True),
    "miss_bonus": ("bonus", None, True),
    "miss_cap": ("cap_free", None, True),
    "miss_oea": ("oea", None, True),
    "miss_groups": ("groups", None, True),
    "miss_k1": ("k1", None, True),
    "miss_tiny": ("tiny_budget", None, True),
    "miss_no_valid": ("no_valid", None, True),
    "miss_all_resident": ("all_resident", None, True),
    "miss_none_resident": ("none_resident", None, True),
    "miss_drop_cap": ("cap_free", "drop", True),
    "miss_similar": ("plain", "similar", True),
    "miss_similar_critical_cap": ("critical_cap", "similar", True),
}
SCENARIOS = [
    "ties", "equal", "dead", "bonus", "oea", "protect_p", "cap", "full", "no_valid",
    "int_valid", "one_bin", "k1", "groups", "sorted", "tiny_budget", "flat", "flat_oea",
    *VARIANTS,
]  # fmt: skip
# Run on every shape and dtype: name -> (policy, miss_aware, cache_bonus)
POLICY_CASES = {
    "lynx": ("lynx", False, 0.0),
    "drop": ("drop", False, 0.0),
    "similar": ("similar", False, 0.0),
    "miss": ("lynx", True, 0.0),
    "miss_similar_bonus": ("similar", True, 0.25),
}


def routing(T, E, k, seed=0, kind="normal", dtypes=DTYPES[0], lead=(), device="cpu"):
    """Logits, their top-k ids and weights (slots shuffled), and num_valid with padding rows."""
    g = torch.Generator().manual_seed(seed)
    shape = (*lead, T, E)
    if kind == "normal":
        logits = torch.randn(shape, generator=g) * 2
    elif kind == "ties":  # experts 2i and 2i+1 share a logit in every row: exact ties
        logits = (torch.randn(shape, generator=g) * 2)[..., torch.arange(E) // 2]
    elif kind in ("equal", "flat"):  # "flat": random ids, so scores tie at the cut
        logits = torch.zeros(shape)
    else:  # "dead": live experts share p exactly (1 / #live), the rest have p = 0
        # (ties that stay exact across implementations: exp() is 1 or 0, sums are exact)
        logits = torch.where(torch.rand(shape, generator=g) < 0.5, 0.0, -1e4)
    ld, wd, idd = dtypes
    logits = logits.to(ld)
    weights, ids = torch.softmax(logits.float(), -1).topk(k)
    if kind == "flat":
        ids = torch.rand(shape, generator=g).argsort(-1)[..., :k]
    perm = torch.rand(*lead, T, k, generator=g).argsort(-1)
    ids, weights = ids.gather(-1, perm), weights.gather(-1, perm)
    num_valid = torch.tensor(T - T // 4, dtype=torch.int32)
    return (logits.to(device), ids.to(idd).to(device), weights.to(wd).to(device),
            num_valid.to(device))  # fmt: skip


def similarity_of(E, seed=0, kind="normal", critical=0.15, device="cpu"):
    """A random ExpertSimilarity: symmetric, diagonal 1, a fraction of experts critical. kind
    "ties": values on a coarse grid (exact in float32), so a slot's most similar experts tie."""
    g = torch.Generator().manual_seed(seed + 1)
    m = torch.rand(E, E, generator=g) * 2 - 1
    if kind == "ties":
        m = torch.round(m * 2) / 2
    m = torch.triu(m, 1) + torch.triu(m, 1).T + torch.eye(E)  # [E, E]
    crit = torch.rand(E, generator=g) < critical  # [E]
    return ExpertSimilarity(m.to(device), crit.to(device))


def resident_of(E, seed=0, device="cpu"):
    """[E] bool: about half the experts resident."""
    return (torch.rand(E, generator=torch.Generator().manual_seed(seed + 2)) < 0.5).to(device)


def policy_inputs(case, E, seed=0, device="cpu"):
    """(params, resident, similarity) for one of POLICY_CASES."""
    policy, miss, bonus = POLICY_CASES[case]
    params = SelectionParams(policy=policy, miss_budget=0.4 if miss else 0.0, cache_bonus=bonus)
    resident = resident_of(E, seed, device) if miss or bonus > 0 else None
    similarity = similarity_of(E, seed, device=device) if policy == "similar" else None
    return params, resident, similarity


def assert_matches(logits, ids, weights, params, num_valid=None, resident=None, similarity=None):
    """Kernels == reference: ids and keep exactly, scores and weights to rounding."""
    ref = select_experts_ref(logits, ids, weights, params, num_valid, resident, similarity)
    out = select_experts_triton(logits, ids, weights, params, num_valid, resident, similarity)
    assert out.topk_ids.dtype == ids.dtype and out.topk_weights.dtype == weights.dtype
    assert out.keep.dtype == torch.bool and out.scores.dtype == torch.float32
    assert torch.equal(out.keep, ref.keep)
    assert torch.equal(out.topk_ids, ref.topk_ids)
    torch.testing.assert_close(out.scores, ref.scores, rtol=1e-5, atol=1e-6)
    tol = 1e-5 if weights.dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.topk_weights, ref.topk_weights, rtol=tol, atol=tol)
    same = (ref.topk_ids == ids).all(-1)  # untouched rows keep their weights bit for bit
    assert torch.equal(out.topk_weights[same], weights[same])
    return out


def scenario(name, device="cpu"):
    """(logits, ids, weights, params, num_valid, resident, similarity) for one named edge case
    (VARIANTS: a base case run with another policy, or miss-aware)."""
    T, E, k = 9, 24, 4
    name, policy, miss = VARIANTS.get(name, (name, None, False))
    params = SelectionParams(budget=0.5)
    kind, lead, resident = "normal", (), None
    if name in ("ties", "equal", "dead", "flat"):
        kind = name
    elif name == "flat_oea":
        kind = "flat"
        params = SelectionParams(policy="oea", protect_top=1)
    elif name == "bonus":
        params = SelectionParams(budget=0.5, cache_bonus=0.3)
        resident = torch.arange(E) % 3 == 0
    elif name == "oea":
        params = SelectionParams(policy="oea", protect_top=2)
    elif name == "protect_p":
        params = SelectionParams(budget=0.3, protect_top=0, protect_p=0.5)
    elif name == "cap":
        params = SelectionParams(budget=0.9, max_experts=5)
    elif name == "cap_free":  # the cap binds on the candidates (nothing rank-protected)
        params = SelectionParams(budget=0.9, max_experts=6, protect_top=0)
    elif name in ("critical", "critical_cap"):  # half the experts critical, none rank-protected
        params = SelectionParams(budget=0.3, protect_top=0, max_experts=5 * (name != "critical"))
    elif name == "full":
        params = SelectionParams(budget=1.0)
    elif name == "one_bin":
        params = SelectionParams(budget=0.4, conf_bins=1, low_conf_weight=4.0)
    elif name == "k1":
        k = 1
    elif name == "groups":
        lead = (3,)
    elif name == "tiny_budget":
        params = SelectionParams(budget=0.01, protect_top=0)
    if policy is not None:
        params = dataclasses.replace(params, policy=policy)
    if miss:
        params = dataclasses.replace(params, miss_budget=params.budget)
        resident = resident_of(E, seed=7) if resident is None else resident
        if name in ("all_resident", "none_resident"):
            resident = torch.full((E,), name == "all_resident")
    similarity = None
    if params.policy == "similar":
        tie = "ties" if name == "ties" else "normal"
        similarity = similarity_of(E, 7, tie, critical=0.5 if "critical" in name else 0.15)
    logits, ids, weights, num_valid = routing(T, E, k, seed=7, kind=kind, lead=lead)
    if name == "sparse_w":  # one slot per row carries the weight
        one = torch.rand(ids.shape, generator=torch.Generator().manual_seed(8)).argsort(-1) == 0
        weights = torch.where(one, weights, 0.0)
    if name == "sorted":
        order = logits.gather(-1, ids).argsort(-1, descending=True)
        ids, weights = ids.gather(-1, order), weights.gather(-1, order)
    if name == "full":
        num_valid = None
    elif name == "no_valid":
        num_valid = torch.tensor([0])
    elif name == "int_valid":
        num_valid = 5
    elif name == "groups":
        num_valid = torch.tensor([9, 4, 0], dtype=torch.int64)
    move = (lambda x: x.to(device)) if device != "cpu" else (lambda x: x)
    if isinstance(num_valid, torch.Tensor):
        num_valid = move(num_valid)
    resident = move(resident) if resident is not None else None
    similarity = ExpertSimilarity(*map(move, similarity)) if similarity is not None else None
    return move(logits), move(ids), move(weights), params, num_valid, resident, similarity


# ---------------------------------------------------------------------------------------------
# CPU (Triton interpreter)
# ---------------------------------------------------------------------------------------------


@CPU
@pytest.mark.parametrize("case", POLICY_CASES)
@pytest.mark.parametrize("dtypes", DTYPES, ids=["fp32", "bf16", "fp16-fp32w"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}-E{}-k{}".format(*s))
def test_kernels_match_reference(shape, dtypes, case):
    logits, ids, weights, num_valid = routing(*shape, seed=sum(shape), dtypes=dtypes)
    params, resident, similarity = policy_inputs(case, shape[1], seed=sum(shape))
    assert_matches(logits, ids, weights, params, num_valid, resident, similarity)


@CPU
@pytest.mark.parametrize("name", SCENARIOS)
def test_kernels_match_reference_edge_cases(name):
    logits, ids, weights, params, num_valid, resident, similarity = scenario(name)
    out = assert_matches(logits, ids, weights, params, num_valid, resident, similarity)
    if name in ("full", "no_valid", "miss_no_valid"):  # nothing to drop / nothing valid
        assert torch.equal(out.topk_ids, ids) and torch.equal(out.topk_weights, weights)
    if similarity is not None:  # chosen critical experts are never moved
        critical = chosen_experts(ids, logits.shape[-1], num_valid) & similarity.critical
        assert out.keep[critical].all() and (critical.any() or "critical" not in name)
    if params.miss_aware and resident is not None and params.max_experts == 0 and params.policy != "oea":
        free = chosen_experts(ids, logits.shape[-1], num_valid) & resident
        assert out.keep[free].all()  # every chosen resident expert is kept


def chosen_experts(ids, E, num_valid):
    """[..., E] bool: the experts the valid rows choose."""
    *lead, T, k = ids.shape
    valid = valid_rows(num_valid, tuple(lead), T, ids.device)[..., None].expand(ids.shape)
    out = torch.zeros(*lead, E + 1, dtype=torch.bool, device=ids.device)
    return out.scatter_(-1, torch.where(valid, ids.long(), E).reshape(*lead, T * k), True)[..., :E]


@CPU
def test_padding_rows_are_remapped_into_the_kept_set():
    logits, ids, weights, num_valid = routing(16, 64, 8, seed=3)
    out = select_experts_triton(logits, ids, weights, SelectionParams(budget=0.3), num_valid)
    assert out.keep[out.topk_ids].all()  # padding rows demand no expert outside the set


@CPU
def test_auto_dispatch_uses_the_kernels_under_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    calls = []

    def spy(*args):
        calls.append(1)
        return select_experts_ref(*args)

    monkeypatch.setattr(kernels, "select_experts_triton", spy)
    logits, ids, weights, num_valid = routing(5, 16, 2)
    select_experts(logits, ids, weights, SelectionParams(), num_valid)
    assert calls == [1]
    select_experts(logits, ids, weights, SelectionParams(), num_valid, backend="torch")
    assert calls == [1]
    monkeypatch.delenv("TRITON_INTERPRET")
    select_experts(logits, ids, weights, SelectionParams(), num_valid)  # plain CPU: torch
    assert calls == [1]


@pytest.mark.skipif(
    interpreted() or torch.cuda.is_available(), reason="the CPU tests run in this process"
)
def test_cpu_tests_in_a_fresh_interpreter_process():
    """Another test module imported Triton compiled before this one (the interpreter is chosen
    at `import triton`), so this module's CPU tests rerun in a process that sets it first."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "-m",
        "not slow",
        __file__,
    ]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and " failed" not in run.stdout


_COMPILE_SCRIPT = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from lynx_sglang.kernels import selection as S

def build(fn, types, consts, **options):
    sig = {n: ("constexpr" if n in consts else types[n]) for n in fn.arg_names}
    src = ASTSource(fn=fn, signature=sig, constexprs=consts)
    triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)

keep = dict(logits_ptr="*bf16", ids_ptr="*i32", nv_ptr="*i32", resident_ptr="*u8",
            critical_ptr="*u8", keep_ptr="*u8", scores_ptr="*fp32", T="i32", E="i32",
            nv_const="i32", nv_stride="i32", conf_bins="i32", low_w="fp32", low_w_m1="fp32",
            bins_m1="fp32", protect_top="i32", protect_p="fp32", bonus="fp32",
            budget_ppm="i32", n_cap="i32")
# (POLICY, NV_FROM_PTR, CACHE_BONUS, MISS_AWARE)
for policy, nv, bonus, miss in [("similar", True, True, True), ("oea", False, False, False),
                                ("drop", False, False, True)]:
    build(S._keep_kernel, keep, dict(K=3, POLICY=policy, NV_FROM_PTR=nv, CACHE_BONUS=bonus,
          MISS_AWARE=miss, SCALE=S.BUDGET_SCALE, BLOCK_T=16, BLOCK_E=8, BLOCK_K=4),
          num_warps=8, enable_fp_fusion=False)
remap = dict(logits_ptr="*fp16", ids_ptr="*i64", w_ptr="*bf16", keep_ptr="*u8",
             sim_ptr="*fp32", ids_out_ptr="*i64", w_out_ptr="*bf16", T="i32", E="i32")
for policy in ("lynx", "drop", "similar"):
    build(S._remap_kernel, remap, dict(K=3, POLICY=policy, BLOCK_T=16, BLOCK_E=8, BLOCK_K=4),
          num_warps=4)
print("compiled")
"""


@pytest.mark.slow
def test_kernels_compile_for_hopper_without_a_gpu():
    """The interpreter accepts code the compiler rejects (globals, unbroadcast operands): build
    both kernels for sm_90 with Triton's bundled ptxas, in a process without the interpreter."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run(
        [sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert run.returncode == 0 and "compiled" in run.stdout, run.stderr[-4000:]


def test_wrapper_rejects_bad_inputs():
    logits, ids, weights, _ = routing(4, 8, 2)
    with pytest.raises(ValueError):
        select_experts_triton(logits, ids[:, :1], weights, SelectionParams())
    with pytest.raises(ValueError):
        select_experts_triton(logits, ids.float(), weights, SelectionParams())
    with pytest.raises(ValueError):
        select_experts_triton(logits, ids, weights, SelectionParams(), resident=torch.ones(3))
    with pytest.raises(ValueError):
        select_experts_triton(logits, ids, weights, SelectionParams(), torch.tensor([1, 2]))
    similar = SelectionParams(policy="similar")
    with pytest.raises(ValueError, match="ExpertSimilarity"):
        select_experts_triton(logits, ids, weights, similar)
    m, crit = similarity_of(8)
    for bad in [(m[:4], crit), (m.int(), crit), (m, crit[:3])]:
        with pytest.raises(ValueError, match="similarity"):
            select_experts_triton(logits, ids, weights, similar, None, None, ExpertSimilarity(*bad))


@CPU
@settings(max_examples=30, deadline=None)
@given(
    st.integers(1, 12), st.integers(2, 40), st.integers(1, 8), st.integers(0, 2**31 - 1),
    st.sampled_from(["normal", "ties", "flat", "dead"]),
    st.sampled_from(["lynx", "oea", "drop", "similar"]), st.booleans(),
    st.sampled_from([0.1, 0.5, 0.8, 1.0]), st.integers(0, 2), st.sampled_from([0.0, 0.6]),
    st.integers(1, 5), st.sampled_from([0, 4]), st.sampled_from([0.0, 0.5]),
    st.sampled_from(["normal", "ties"]),
)  # fmt: skip
def test_kernels_match_reference_on_random_policies(
    T, E, k, seed, kind, policy, miss, budget, protect_top, protect_p, bins, cap, bonus, sim
):
    k = min(k, E)
    params = SelectionParams(
        policy=policy, budget=budget, max_experts=cap, protect_top=protect_top,
        protect_p=protect_p, conf_bins=bins, cache_bonus=bonus, miss_budget=budget if miss else 0.0,
    )  # fmt: skip
    logits, ids, weights, num_valid = routing(T, E, k, seed=seed, kind=kind)
    resident = torch.rand(E, generator=torch.Generator().manual_seed(seed)) < 0.5
    similarity = similarity_of(E, seed, sim, critical=0.2)
    assert_matches(logits, ids, weights, params, num_valid, resident, similarity)


@st.composite
def batches(draw):
    """(logits, ids, weights, num_valid, seed): a small decode batch, one group."""
    E = draw(st.integers(2, 40))
    k, T = draw(st.integers(1, min(E, 8))), draw(st.integers(1, 12))
    seed = draw(st.integers(0, 2**31 - 1))
    kind = draw(st.sampled_from(["normal", "ties", "flat", "dead"]))
    return (*routing(T, E, k, seed=seed, kind=kind), seed)


@CPU
@settings(max_examples=12, deadline=None)
@given(batches(), st.sampled_from([0.1, 0.4, 0.8]), st.integers(0, 2), st.sampled_from([0, 3]))
def test_drop_weighs_moved_choices_zero_and_keeps_row_sums(batch, budget, protect_top, cap):
    logits, ids, weights, num_valid, _ = batch
    params = SelectionParams(policy="drop", budget=budget, protect_top=protect_top, max_experts=cap)
    out = select_experts_triton(logits, ids, weights, params, num_valid)
    stay = out.keep[ids]  # [T, k] choices of kept experts
    changed = (out.topk_ids != ids).any(-1)  # [T]
    dropped = changed & (torch.where(stay, weights, 0.0).sum(-1) > 0)  # renormalised rows
    assert torch.equal(out.topk_ids[stay], ids[stay])
    assert (out.topk_weights[dropped[:, None] & ~stay] == 0).all()
    torch.testing.assert_close(out.topk_weights.sum(-1)[dropped], weights.sum(-1)[dropped])
    assert torch.equal(out.topk_weights[~changed], weights[~changed])
    assert out.keep[out.topk_ids[changed]].all()  # changed rows name only kept experts
    assert (out.topk_ids.sort(-1).values.diff(dim=-1) != 0).all()  # k distinct ids a row


@CPU
@settings(max_examples=12, deadline=None)
@given(batches(), st.sampled_from([0.1, 0.4, 0.8]), st.integers(0, 2), st.booleans())
def test_similar_moves_to_the_most_similar_free_kept_expert(batch, budget, protect_top, ties):
    logits, ids, weights, num_valid, seed = batch
    E = logits.shape[-1]
    sim = similarity_of(E, seed, "ties" if ties else "normal", critical=0.3)
    params = SelectionParams(policy="similar", budget=budget, protect_top=protect_top)
    out = select_experts_triton(logits, ids, weights, params, num_valid, None, sim)
    assert torch.equal(out.topk_weights, weights)  # every weight stays, bit for bit
    assert out.keep[chosen_experts(ids, E, num_valid) & sim.critical].all()
    assert (out.topk_ids.sort(-1).values.diff(dim=-1) != 0).all()
    for t, j in (out.topk_ids != ids).nonzero().tolist():  # moved slots
        lost, got = ids[t, j], out.topk_ids[t, j]
        # kept experts in neither the old nor the new row were free at this slot's turn
        free = out.keep.clone()
        free[ids[t]] = False
        free[out.topk_ids[t]] = False
        assert out.keep[got] and (sim.matrix[lost, free] <= sim.matrix[lost, got]).all()
        assert not (free & (sim.matrix[lost] == sim.matrix[lost, got]))[:got].any()  # ties


@CPU
@settings(max_examples=12, deadline=None)
@given(batches(), st.sampled_from([0.1, 0.4, 0.8]), st.sampled_from([0, 3, 6]), st.booleans())
def test_miss_aware_keeps_resident_experts_first(batch, budget, cap, bonus):
    """Nothing protected here, so the kept set is exactly n = R + ceil(miss_budget * (D - R)) (at
    least k, at most the cap) of the chosen experts, the resident ones first."""
    logits, ids, weights, num_valid, seed = batch
    E, k = logits.shape[-1], ids.shape[-1]
    params = SelectionParams(
        budget=1.0, max_experts=cap, protect_top=0, miss_budget=budget, cache_bonus=0.5 * bonus
    )
    resident = resident_of(E, seed)
    out = select_experts_triton(logits, ids, weights, params, num_valid, resident)
    chosen = chosen_experts(ids, E, num_valid)
    D, R = int(chosen.sum()), int((chosen & resident).sum())
    n = max(R + ((D - R) * params.miss_budget_ppm + BUDGET_SCALE - 1) // BUDGET_SCALE, k)
    n = min(n, max(cap, k)) if cap else n
    assert not (out.keep & ~chosen).any() and int(out.keep.sum()) == min(n, D)
    if (out.keep & ~resident).any() or cap == 0:
        assert out.keep[chosen & resident].all()


# ---------------------------------------------------------------------------------------------
# GPU (compiled)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", POLICY_CASES)
@pytest.mark.parametrize("dtypes", DTYPES, ids=["fp32", "bf16", "fp16-fp32w"])
@pytest.mark.parametrize("shape", SHAPES + [(256, 128, 8), (64, 512, 8)], ids=str)
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_kernels_match_reference_gpu(shape, dtypes, case):
    logits, ids, weights, num_valid = routing(*shape, seed=sum(shape), dtypes=dtypes, device="cuda")
    params, resident, similarity = policy_inputs(case, shape[1], seed=sum(shape), device="cuda")
    assert_matches(logits, ids, weights, params, num_valid, resident, similarity)


@pytest.mark.parametrize("name", SCENARIOS)
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_kernels_match_reference_edge_cases_gpu(name):
    assert_matches(*scenario(name, device="cuda"))


@pytest.mark.parametrize("case", ["lynx", "drop", "miss_similar_bonus"])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_kernels_replay_in_a_cuda_graph(case):
    """Captured once with a device num_valid; replays follow new inputs and counts."""
    T, E, k = 32, 64, 8
    logits, ids, weights, num_valid = routing(T, E, k, device="cuda")
    params, resident, similarity = policy_inputs(case, E, device="cuda")
    params = dataclasses.replace(params, budget=0.4)
    args = (params, num_valid, resident, similarity)
    select_experts_triton(logits, ids, weights, *args)  # compile outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = select_experts_triton(logits, ids, weights, *args)
    for seed, nv in [(1, 32), (2, 5), (3, 0), (4, 17)]:
        new_logits, new_ids, new_weights, _ = routing(T, E, k, seed=seed, device="cuda")
        logits.copy_(new_logits), ids.copy_(new_ids), weights.copy_(new_weights)
        num_valid.fill_(nv)
        graph.replay()
        ref = select_experts_ref(logits, ids, weights, params, nv, resident, similarity)
        assert torch.equal(out.topk_ids, ref.topk_ids) and torch.equal(out.keep, ref.keep)
        torch.testing.assert_close(out.topk_weights, ref.topk_weights)
