"""`make demo`: the main job on the shipped model, on any machine (CPU-only included).

1. The quality harness (--quick): distinct experts per decode step and the quality cost of
   batch-aware selection at batch 16.
2. The offload comparison (--quick): resident, offloading alone, Lynx alone and Lynx+offload on
   the same routing, with exact counters (and measured times on a GPU, projected on a CPU).
"""

from __future__ import annotations

import sys


def main() -> None:
    from bench import quality

    print("=" * 100)
    print("lynx-sglang demo: quality cost of batch-aware expert selection (shipped model)")
    print("=" * 100)
    quality.main(["--quick"])
    try:
        from bench import compare_offload
    except ImportError:
        return
    print()
    print("=" * 100)
    print("lynx-sglang demo: Lynx + expert cache vs offloading alone")
    print("=" * 100)
    compare_offload.main(["--quick"])


if __name__ == "__main__":
    sys.exit(main())
