"""One rule for when two class names mean the same class: a lab's folder names against a model's classes.

Used where a folder meets a model: scoring a model on a labelled folder and fine-tuning a model on one.
"""

from __future__ import annotations

import re
from typing import Sequence


def normalise_name(name: str) -> str:
    """Case, spaces, underscores and hyphens ignored: 'Band_Neutrophils' -> 'bandneutrophils'."""
    return re.sub(r"[\s_\-]+", "", str(name)).lower()


def _forms(name: str) -> set[str]:
    """The normalised name and its singulars by the trailing-s / -es rule."""
    n = normalise_name(name)
    forms = {n}
    if n.endswith("es") and len(n) > 3:
        forms.add(n[:-2])
    if n.endswith("s") and len(n) > 2:
        forms.add(n[:-1])
    return forms


def resolve_class(name: str, class_names: Sequence[str]) -> str | None:
    """The model class a name stands for (exact, then normalised, then singular/plural), or None."""
    if name in class_names:
        return name
    exact = [c for c in class_names if normalise_name(c) == normalise_name(name)]
    if len(exact) == 1:
        return exact[0]
    loose = [c for c in class_names if _forms(c) & _forms(name)]
    return loose[0] if len(loose) == 1 else None
