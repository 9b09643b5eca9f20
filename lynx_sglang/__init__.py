"""lynx-sglang: batch-aware expert selection (Lynx) and a CPU-GPU expert cache for MoE decode.

The core (``config``, ``selection``, ``kernels``, ``offload``, ``model``) imports only torch and
triton; ``lynx_sglang.sglang`` is the only package that imports SGLang.
"""

from pathlib import Path

__version__ = "0.1.0"

# The small Qwen3-MoE models trained by bench/train_model.py and shipped with the package:
# 64 experts top-8 (the CI fixture), and Qwen3-30B-A3B's routing shape, 128 experts top-8.
SHIPPED_MODEL = Path(__file__).parent / "data" / "lynx-moe-tiny"
SHIPPED_MODEL_E128 = Path(__file__).parent / "data" / "lynx-moe-e128"
SHIPPED_MODELS = (SHIPPED_MODEL, SHIPPED_MODEL_E128)

__all__ = ["SHIPPED_MODEL", "SHIPPED_MODELS", "SHIPPED_MODEL_E128", "__version__"]
