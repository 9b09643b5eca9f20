"""A block-FP8 copy of a shipped model, laid out like Qwen's and DeepSeek's FP8 checkpoints.

    python -m bench.quantize_model --out /tmp/lynx-moe-tiny-fp8 [--model lynx_sglang/data/lynx-moe-tiny]

Every routed expert's gate, up and down projection is quantised round-to-nearest (no
calibration data) to e4m3 with one float32 scale per 128 x 128 block, stored beside it as
``...weight_scale_inv``; everything else (attention, router, norms, embeddings) stays as it is
and is listed in ``modules_to_not_convert``. ``config.json`` gains the ``quantization_config``
that SGLang's ``Fp8Config`` reads (``quant_method: fp8``, ``weight_block_size``), so SGLang and
the tests load it through the same FP8 MoE weight loaders as a real FP8 release.

Generated copies are not committed (the tree must travel to a GPU machine); tests make one in a
temporary directory in seconds. Prints a table, then a compact JSON line.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path

from lynx_sglang import SHIPPED_MODEL
from lynx_sglang.offload.quantize import BLOCK, quantize_block_fp8

EXPERT = re.compile(r"\.mlp\.experts\.\d+\.(gate|up|down)_proj\.weight$")


def quantize_model(model: Path, out: Path) -> dict:
    """Write the FP8 copy of ``model`` to ``out``; returns what it wrote (bytes, tensors)."""
    from safetensors.torch import load_file, save_file

    out.mkdir(parents=True, exist_ok=True)
    tensors = load_file(str(model / "model.safetensors"))
    written, kept = {}, set()
    before = expert_before = expert_after = 0
    for name, t in tensors.items():
        before += t.numel() * t.element_size()
        if EXPERT.search(name):
            q, scale_inv = quantize_block_fp8(t)
            written[name], written[name + "_scale_inv"] = q, scale_inv.contiguous()
            expert_before += t.numel() * t.element_size()
            expert_after += q.numel() + scale_inv.numel() * 4
        else:
            written[name] = t.contiguous()
            kept.add(name.rsplit(".", 1)[0])
    save_file(written, str(out / "model.safetensors"))
    config = json.loads((model / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": list(BLOCK),
        "modules_to_not_convert": sorted(kept),
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for f in model.iterdir():  # tokenizer and the rest, as they are
        if f.name not in ("config.json", "model.safetensors") and f.is_file():
            shutil.copy2(f, out / f.name)
    return {
        "bench": "quantize_model",
        "model": model.name,
        "out": str(out),
        "format": "block-fp8 e4m3, 128x128 float32 scale_inv, experts only",
        "expert_tensors": sum(1 for k in written if EXPERT.search(k)),
        "bytes_before": before,
        "bytes_after": sum(x.numel() * x.element_size() for x in written.values()),
        "expert_bytes_before": expert_before,
        "expert_bytes_after": expert_after,
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=SHIPPED_MODEL)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    if args.out.resolve() == args.model.resolve():
        sys.exit("quantize_model: --out must differ from --model")
    r = quantize_model(args.model, args.out)
    print(f"{'':24}{'before':>14}{'after':>14}")
    print(f"{'all tensors (bytes)':24}{r['bytes_before']:>14,}{r['bytes_after']:>14,}")
    print(
        f"{'expert tensors (bytes)':24}{r['expert_bytes_before']:>14,}{r['expert_bytes_after']:>14,}"
    )
    print(f"{r['expert_tensors']} expert tensors quantised; written to {r['out']}")
    print(json.dumps(r, separators=(",", ":")))
    return r


if __name__ == "__main__":
    main()
