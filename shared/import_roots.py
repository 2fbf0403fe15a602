"""Keeps a pagewire source checkout's root off `sys.path`, and starts our own processes safely.

The checkout's top-level folders (`kernels/`, `shared/`, `services/`, `protos/`, `tests/`) are
not import roots: they install as `pagewire.*`. Their names collide with packages on PyPI
(transformers imports Hugging Face's `kernels`), so a process with the checkout root on
`sys.path` would import our folder in the other package's place. Python puts it there by itself
for `python -c`, `python -m` and scripts started in the root. Two defences, both needed:

- every process pagewire starts runs `python -P` (no current directory on `sys.path`);
- importing `pagewire` drops checkout roots from `sys.path` (and forgets any module already
  imported from one), so a user's `python -c "from pagewire import LLM"` in the root works too.

This module must never touch a `sys.path` entry that is not a pagewire checkout's root.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# What a pagewire checkout's root holds; site-packages, where an installed copy lives, holds none.
_CHECKOUT_MARKERS = ("pyproject.toml", "shared/__init__.py", "protos/pagewire", "kernels")


def is_checkout_root(entry: str) -> bool:
    """True when a `sys.path` entry ('' is the current directory) is a pagewire checkout."""
    root = Path(entry or os.getcwd())
    return all((root / marker).exists() for marker in _CHECKOUT_MARKERS)


def drop_checkout_roots() -> list[str]:
    """Removes checkout roots from `sys.path` and the modules imported from them; returns them."""
    dropped = [entry for entry in sys.path if is_checkout_root(entry)]
    if not dropped:
        return []
    sys.path[:] = [entry for entry in sys.path if entry not in dropped]
    roots = {Path(entry or os.getcwd()).resolve() for entry in dropped}
    for name, module in list(sys.modules.items()):
        origin = getattr(module, "__file__", None)
        if "." in name or not origin:
            continue
        shadows = {root / name / "__init__.py" for root in roots} | {root / f"{name}.py"
                                                                     for root in roots}
        if Path(origin).resolve() in shadows:  # e.g. our kernels/ taken for HF's `kernels`
            for submodule in [n for n in sys.modules if n.startswith(f"{name}.")]:
                del sys.modules[submodule]
            del sys.modules[name]
    return dropped


def pagewire_argv(*args: str) -> list[str]:
    """The command line that runs `pagewire ARGS` on this interpreter, from any directory."""
    return [sys.executable, "-P", "-m", "pagewire.cli", *args]
