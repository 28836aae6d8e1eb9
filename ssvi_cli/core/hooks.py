"""Hooks of a :class:`ssvi_cli.Subspace` on the user's model and optimizer, and the mean over ranks
its remove-and-add step scores with under ``torch.distributed``."""

from __future__ import annotations

import weakref
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

# The Subspace attached to each model: a second one replaces it (a notebook cell run twice would
# otherwise leave two sets of hooks on one model). Kept here, not in the api module, so that a
# Subspace made after that module is reloaded (importlib.reload, an autoreload) still finds it.
ATTACHED: "weakref.WeakKeyDictionary[nn.Module, weakref.ref]" = weakref.WeakKeyDictionary()


class Hook:
    """A hook on the user's model or optimizer (a Subspace's, ``ssvi.sampling``'s). A copy
    (``copy.deepcopy(model)`` for an EMA or SWA model, a pickled whole model) gets a hook that does
    nothing, instead of a copy of the Subspace and its optimizer acting on the copied model, or of a
    block's state that its end does not undo."""

    def __init__(self, fn: Optional[Callable[..., None]]) -> None:
        self.fn = fn

    def __call__(self, *args: Any) -> None:
        if self.fn is not None:
            self.fn(*args)

    def __reduce__(self) -> tuple[type, tuple[None]]:
        return Hook, (None,)


def rank_mean(t: Tensor) -> Tensor:
    out = t.detach().clone()
    torch.distributed.all_reduce(out)
    return out.div_(torch.distributed.get_world_size())
