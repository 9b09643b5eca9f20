"""Saving the benchmarks' figures small: the tracked tree must travel to a GPU machine.

A matplotlib figure is written as a 256-colour palette PNG (the charts have a handful of flat
colours, so nothing visible is lost): a third of the size of the RGBA file ``savefig`` writes.
"""

from __future__ import annotations

import io
from pathlib import Path


def shrink_png(path: str | Path) -> None:
    """Rewrite a PNG in place as a 256-colour palette image."""
    from PIL import Image  # matplotlib's own dependency

    with Image.open(path) as im:
        small = im.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    small.save(path, optimize=True)


def save_png(fig, path: str | Path, dpi: int) -> str:
    """``fig.savefig(path, dpi=dpi)``, written as a palette PNG; returns the path."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    Path(path).write_bytes(buf.getvalue())
    shrink_png(path)
    return str(path)
