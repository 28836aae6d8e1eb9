"""Training on part of a dataset's classes (``data.classes``): which classes a list names, the spec
of the kept ones and the images of each side.

An entry of ``data.classes`` that equals one of the dataset's class names is that class; any other
entry must be an index ``0..K-1`` into the dataset's classes (so ``0,1,2,3,4`` are the digits 0-4,
and an image folder's classes may be named by their folder names). The kept classes are relabelled
``0..k-1`` in the order listed; the others are held out.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence

import torch

from ssvi_cli.data.spec import DataError, DataSpec, RawImages

_SHOWN = 12  # class names listed in an error message


def _valid(names: tuple[str, ...]) -> str:
    if names == tuple(str(i) for i in range(len(names))):  # the digits: names are the indices
        return f"0..{len(names) - 1}"
    shown = ", ".join(names[:_SHOWN]) + (", ..." if len(names) > _SHOWN else "")
    return f"indices 0..{len(names) - 1} or the class names ({shown})"


def resolve_classes(wanted: Sequence[str], names: tuple[str, ...], dataset: str) -> tuple[int, ...]:
    """Indices into ``names`` of the entries of ``wanted`` (a class name, else an index), in order.

    Unknown entries, a class named twice, fewer than two classes raise :class:`DataError`.
    """
    entries = [str(entry).strip() for entry in wanted]
    if len(entries) < 2:
        raise DataError(f"data.classes lists {len(entries)} class(es); a classifier needs at least two "
                        f"(classes of {dataset}: {_valid(names)})")
    position = {name: i for i, name in enumerate(names)}
    kept: list[int] = []
    for entry in entries:
        if entry in position:
            index = position[entry]
        elif entry.isascii() and entry.isdigit() and int(entry) < len(names):
            index = int(entry)
        else:
            raise DataError(f"data.classes: {entry!r} is not a class of {dataset}; valid are {_valid(names)}")
        if index in kept:
            raise DataError(f"data.classes names class {names[index]!r} twice; list each class once")
        kept.append(index)
    return tuple(kept)


def restrict_spec(spec: DataSpec, kept: tuple[int, ...]) -> DataSpec:
    """The spec of a model of the ``kept`` classes of ``spec``'s dataset (labels ``0..k-1``)."""
    return replace(spec, num_classes=len(kept), class_names=tuple(spec.class_names[i] for i in kept),
                   dataset_classes=spec.class_names)


def split_classes(raw: RawImages, kept: tuple[int, ...]) -> tuple[RawImages, torch.Tensor]:
    """(the images of the ``kept`` classes relabelled ``0..k-1``, the images of the other classes)."""
    relabel = torch.full((len(raw.class_names),), -1, dtype=torch.long)
    relabel[torch.tensor(kept, dtype=torch.long)] = torch.arange(len(kept))
    new_labels = relabel[raw.labels]
    inside = new_labels >= 0
    kept_raw = RawImages(raw.images[inside], new_labels[inside], tuple(raw.class_names[i] for i in kept))
    return kept_raw, raw.images[~inside]
