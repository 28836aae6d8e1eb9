"""The dense weights ``sparsify`` takes out of a model, remembered so that an optimizer built before
the conversion, which holds them and not the sparse layers, is refused at its first step rather than
leaving the model untrained without a word (a loop with ``Subspace`` is checked there too)."""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

REPLACED = "_ssvi_replaced"  # on a parameter sparsify took out of the model: the layer's name
_hooked = False  # the optimizers' step pre-hook is registered (once, by the first conversion)
# optimizer -> its parameter count when found clean; by id, as an optimizer class may define __eq__
# without __hash__
_CHECKED: WeakIdKeyDictionary = WeakIdKeyDictionary()


def mark_replaced(module: nn.Module, name: str) -> None:
    """``module``'s own weights were taken out of a model, where it was the layer ``name``."""
    global _hooked
    for param in module.parameters(recurse=False):
        setattr(param, REPLACED, name)
    _CHECKED.clear()  # an optimizer found clean before may hold these weights: every one is looked at again
    if not _hooked:
        from torch.optim.optimizer import register_optimizer_step_pre_hook

        register_optimizer_step_pre_hook(_refuse_replaced_weights)
        _hooked = True


def unmark(modules: Iterable[nn.Module]) -> None:
    """Layers put back into a model after ``sparsify`` replaced them (``ssvi_cli.load`` keeping a
    plain head, or undoing a load that failed): their weights are the model's again."""
    for module in modules:
        for param in module.parameters(recurse=False):  # as mark_replaced marked them: a layer's own
            if hasattr(param, REPLACED):
                delattr(param, REPLACED)
    _CHECKED.clear()


def _refuse_replaced_weights(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    """Before any optimizer's step: one built before ``sparsify`` holds the dense weights taken out of
    the model, and stepping it would leave the sparse layers untrained without a word. A weight taken
    out that has a gradient other than zero is in use elsewhere (another model sharing it) and passes;
    one whose gradient a ``zero_grad(set_to_none=False)`` left at zeros does not. An optimizer found
    clean is looked through again only when its parameter count changes or a layer is converted; one
    that passed only on such a gradient, at every step."""
    count = sum(len(group["params"]) for group in optimizer.param_groups)
    if _CHECKED.get(optimizer) == count:
        return
    taken = [p for g in optimizer.param_groups for p in g["params"] if hasattr(p, REPLACED)]
    name = next((getattr(p, REPLACED) for p in taken if p.grad is None or not p.grad.any()), None)
    if name is not None:
        raise ValueError(f"this {type(optimizer).__name__} holds the weights of {name!r} that sparsify took out of the "
                         "model, not its sparse layers, which would never train; build the optimizer after sparsify, "
                         "from ssvi_cli.param_groups(model, lr, lr_sigma) or model.parameters()")
    if not taken:
        _CHECKED[optimizer] = count
