"""lynx-sglang: batch-aware expert selection (Lynx) and a CPU-GPU expert cache for MoE decode.

The core (``config``, ``selection``, ``kernels``, ``offload``, ``model``) imports only torch and
triton; ``lynx_sglang.sglang`` is the only package that imports SGLang.
"""

from pathlib import Path

__version__ = "0.1.0"

# The small Qwen3-MoE model trained by bench/train_model.py and shipped with the package.
SHIPPED_MODEL = Path(__file__).parent / "data" / "lynx-moe-tiny"

__all__ = ["SHIPPED_MODEL", "__version__"]
