"""The training corpus: the Python standard library's own source, which every machine has.

A fixed, path-hashed split keeps ~2% of files held out. The held-out text is shipped beside the
model (``heldout.txt``) so evaluation does not depend on the evaluating machine's Python.

Out-of-domain text: English prose no model saw in training, the IDLE editor's plain-text notes
that CPython ships in ``idlelib/`` (``*.txt``: news, history, read-me; PSF licence). Training
reads only ``*.py`` files, so none of it is in the training split; ``build_prose`` joins them
and the result is shipped as ``lynx_sglang/data/prose_ood.txt``.

A second domain for training, when asked (``bench.train_model --docs-fraction``): the long
descriptions (read-mes: Markdown or reStructuredText prose, with some code) of the Python
packages installed beside the interpreter, the body of each ``*.dist-info/METADATA``. Text in
more than one domain leaves a router room to specialise experts by domain, as a real model's do.
"""

from __future__ import annotations

import hashlib
import sysconfig
from pathlib import Path

_SKIP_PARTS = {"site-packages", "test", "tests", "idle_test", "__pycache__"}


def stdlib_files(root: str | Path | None = None) -> list[Path]:
    """Sorted .py files of the standard library, without test suites and site-packages."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    out = []
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root)
        if _SKIP_PARTS.intersection(rel.parts[:-1]):
            continue
        out.append(p)
    return out


def is_heldout(rel_path: str, modulus: int = 50) -> bool:
    """A file is held out when the md5 of its relative path is 0 modulo ``modulus``."""
    return int(hashlib.md5(rel_path.encode()).hexdigest(), 16) % modulus == 0


def split_corpus(root: str | Path | None = None, skip: tuple[str, ...] = ()) -> tuple[str, str]:
    """(train_text, heldout_text), files joined by a blank line, in path order; files whose
    relative path starts with one of ``skip`` are left out of both."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    train, held = [], []
    for p in stdlib_files(root):
        if str(p.relative_to(root)).startswith(skip):
            continue
        try:
            text = p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        (held if is_heldout(str(p.relative_to(root))) else train).append(text)
    return "\n\n".join(train), "\n\n".join(held)


def split_readmes(site_packages: str | Path | None = None, min_chars: int = 2000) -> tuple[str, str]:
    """(train_text, heldout_text) of the installed packages' read-mes (METADATA bodies of at
    least ``min_chars``), one per distribution name, split by the same path hash as the code."""
    root = Path(site_packages or sysconfig.get_paths()["purelib"])
    seen, train, held = set(), [], []
    for meta in sorted(root.glob("*.dist-info/METADATA")):
        name = meta.parent.name.split("-")[0].lower().replace("_", "-")
        text = meta.read_text(encoding="utf-8", errors="replace")
        body = text.split("\n\n", 1)[1].strip() if "\n\n" in text else ""
        if name in seen or len(body) < min_chars:
            continue
        seen.add(name)
        (held if is_heldout(name) else train).append(body)
    return "\n\n".join(train), "\n\n".join(held)


PROSE_FILES = ("NEWS.txt", "NEWS2x.txt", "HISTORY.txt", "README.txt", "TODO.txt", "extend.txt",
               "CREDITS.txt")  # fmt: skip


def build_prose(root: str | Path | None = None) -> str:
    """CPython's ``idlelib/*.txt`` notes (English prose, never read by training), joined."""
    root = Path(root or sysconfig.get_paths()["stdlib"]) / "idlelib"
    return "\n\n".join((root / name).read_text(encoding="utf-8") for name in PROSE_FILES)
