"""The study's classes: DeepPostures' label map (class name -> index) and what follows from it.

DeepPostures' pre-processing turns activPAL event codes into class indices with a label map
chosen per study; the default gives two classes, sitting 0 and not-sitting 1; with its
``--num-classes 3`` a study may use sitting 0, standing 1, stepping 2 (shared/reference/
deeppostures.md). Here a study's map is ``{class name: index}`` with indices exactly 0 .. C-1;
C is the number of classes the files' labels, the model's output layer, the class weights, the
balanced accuracy and the CSV's names follow. ``-1`` is always "no label".
"""

from __future__ import annotations

import json
from collections.abc import Mapping

__all__ = ["DEFAULT_LABEL_MAP", "NO_LABEL", "check_label_map", "class_names"]

DEFAULT_LABEL_MAP: dict[str, int] = {"sitting": 0, "not-sitting": 1}
NO_LABEL = "no-label"  # the name DeepPostures prints for label -1


def check_label_map(label_map: Mapping[str, int] | str | None) -> dict[str, int]:
    """A label map as ``{name: index}`` (a mapping or its JSON text; None = the default), checked:
    at least two classes, indices exactly 0 .. C-1 once each, names non-empty, without commas
    (they go into CSV cells) and not ``no-label``. Raises ``ValueError`` naming the problem."""
    if label_map is None:
        return dict(DEFAULT_LABEL_MAP)
    if isinstance(label_map, str):
        try:
            label_map = json.loads(label_map)
        except json.JSONDecodeError as e:
            raise ValueError(f"label map: expected JSON such as {json.dumps(DEFAULT_LABEL_MAP)}, got "
                             f"{label_map!r} ({e})") from None
    if not isinstance(label_map, Mapping):
        raise ValueError(f"label map: expected an object of class name -> index, got {label_map!r}")
    out: dict[str, int] = {}
    for name, index in label_map.items():
        if not isinstance(name, str) or not name.strip() or "," in name or "\n" in name or name == NO_LABEL:
            raise ValueError(f"label map: expected class names without commas or line breaks, other than "
                             f"{NO_LABEL!r}, got {name!r}")
        if not isinstance(index, int) or isinstance(index, bool):
            raise ValueError(f"label map: expected an integer index for {name!r}, got {index!r}")
        out[name] = index
    if len(out) < 2 or sorted(out.values()) != list(range(len(out))):
        raise ValueError(f"label map: expected at least two classes with the indices 0 .. C-1 once each, "
                         f"got {dict(label_map)}")
    return dict(sorted(out.items(), key=lambda kv: kv[1]))


def class_names(label_map: Mapping[str, int] | str | None = None) -> dict[int, str]:
    """Index -> name, with ``-1`` -> ``no-label``: what a prediction CSV prints."""
    return {**{i: n for n, i in check_label_map(label_map).items()}, -1: NO_LABEL}
