"""bench/figures.py: the benchmarks' PNGs are written as palette images, same pixels' size."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
from PIL import Image  # noqa: E402

from bench.figures import save_png  # noqa: E402


def test_save_png_writes_a_smaller_palette_png_of_the_same_size(tmp_path):
    fig, ax = plt.subplots(figsize=(4, 3))
    for i in range(6):
        ax.errorbar(range(10), [i * x for x in range(10)], yerr=1.0, label=f"line {i}")
    ax.legend()
    fig.savefig(tmp_path / "plain.png", dpi=100)
    out = save_png(fig, tmp_path / "small.png", dpi=100)
    plt.close(fig)
    with Image.open(tmp_path / "plain.png") as plain, Image.open(out) as small:
        assert small.mode == "P" and small.size == plain.size
    assert (tmp_path / "small.png").stat().st_size < (tmp_path / "plain.png").stat().st_size
