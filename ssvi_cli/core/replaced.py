"""What any optimizer's step is checked against, by one pre-hook of every optimizer: the dense weights
``sparsify`` takes out of a model, remembered so that an optimizer built before the conversion, which
holds them and not the sparse layers, is refused at its first step rather than leaving the model
untrained without a word; and the sparse layers' μ and ρ, so that an optimizer whose per-entry state
belongs to another support of a layer (the model loaded under an optimizer that stepped it) is refused
rather than failing with torch's bare size mismatch, or, fused, stepping wrongly (a loop with
``Subspace`` is checked there too)."""

from __future__ import annotations

import weakref
from typing import Any, Iterable, Optional

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

REPLACED = "_ssvi_replaced"  # on a parameter sparsify took out of the model: the layer's name
_hooked = False  # the optimizers' step pre-hook is registered (once, by the first conversion or layer)
# optimizer -> its parameter count when found clean; by id, as an optimizer class may define __eq__
# without __hash__
_CHECKED: WeakIdKeyDictionary = WeakIdKeyDictionary()
_SPARSE: WeakIdKeyDictionary = WeakIdKeyDictionary()  # a sparse layer's mu or rho -> "mu of a (7, 12) weight"
_MODELS: WeakIdKeyDictionary = WeakIdKeyDictionary()  # optimizer -> weakref of the model whose layers it steps
_WATCHED: WeakIdKeyDictionary = WeakIdKeyDictionary()  # optimizer -> its hook that forgets it was found clean
_SIZES: WeakIdKeyDictionary = WeakIdKeyDictionary()  # an LBFGS -> its sparse parameters' sizes when last checked
STATE_ADVICE = ("the optimizer's state belongs to another support of the layer (a model loaded under an optimizer "
                "that stepped it, or an optimizer state loaded without the model state saved with it); build the "
                "optimizer again after loading, or load the model's and the optimizer's state_dicts saved together")


class OptimizerStateError(TypeError):
    """An optimizer whose per-parameter state a remove-and-add step cannot reset, or that belongs to
    another support of a layer."""


def mark_replaced(module: nn.Module, name: str) -> None:
    """``module``'s own weights were taken out of a model, where it was the layer ``name``."""
    for param in module.parameters(recurse=False):
        setattr(param, REPLACED, name)
    _CHECKED.clear()  # an optimizer found clean before may hold these weights: every one is looked at again
    _hook()


def support_set(shape: tuple[int, ...], mu: tuple[nn.Parameter, torch.Tensor],
                rho: Optional[tuple[nn.Parameter, torch.Tensor]]) -> None:
    """A sparse layer of a ``shape`` weight takes a support: its μ and ρ (None: a deterministic layer),
    each as (parameter, its new values). Parameters that change size lose their gradient, of the old
    size, and the gradient accumulator autograd keeps for each while a graph of the old size lives (the
    last step's ``loss``, still held), which would fail the next backward with torch's bare shape
    mismatch: torch drops it when a tensor's data takes another dtype, so each takes an empty one of
    another dtype before its new values (float16 or float32, which every device holds: not float64,
    which Apple's GPU does not)."""
    resized = mu[1].numel() != mu[0].numel()
    for part, (param, values) in (("mu", mu), ("rho", rho)) if rho is not None else (("mu", mu),):
        if param not in _SPARSE:
            _SPARSE[param] = f"{part} of a sparse layer's {tuple(shape)} weight"
        values = values.to(param.device, param.dtype).contiguous()
        if resized:
            param.grad = None
            param.data = param.data.new_empty(0, dtype=torch.float16 if param.dtype == torch.float32 else torch.float32)
        param.data = values
    if resized:
        _CHECKED.clear()  # an optimizer found clean before may hold state of the old size
    _hook()


def name_layers(optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
    """Name ``model``'s layers (``0.mu``) in the step pre-hook's refusals of ``optimizer`` (a
    ``Subspace`` knows the model its optimizer steps)."""
    _MODELS[optimizer] = weakref.ref(model)


def _named(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> str:
    """``param`` as ``layer.mu`` in the model :func:`name_layers` gave, else as its weight's shape."""
    model = _MODELS[optimizer]() if optimizer in _MODELS else None
    for name, module in model.named_modules() if model is not None else ():
        for part in ("mu", "rho"):
            if module._parameters.get(part) is param:
                return f"{name}.{part}"
    return f"the {_SPARSE[param]}"


def _hook() -> None:
    global _hooked
    if not _hooked:
        from torch.optim.optimizer import register_optimizer_step_pre_hook

        register_optimizer_step_pre_hook(_refuse_replaced_weights)
        _hooked = True


def state_misfit(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> Optional[tuple[str, int]]:
    """A per-entry state tensor of the 1-D ``param`` (a moment, a momentum buffer) of another size:
    its key and size; None when all fit."""
    for key, value in (optimizer.state.get(param) or {}).items():
        if isinstance(value, torch.Tensor) and value.dim() == 1 == param.dim() and value.numel() != param.numel():
            return key, value.numel()
    return None


def _lbfgs_misfit(optimizer: torch.optim.LBFGS, sizes: tuple[int, ...]) -> bool:
    """LBFGS keeps one direction and history over all its parameters flattened, under its first: they
    belong to other supports when the sparse layers' sizes moved since it was last found clean, or
    when their length is not the parameters' total."""
    state = optimizer.state.get(optimizer.param_groups[0]["params"][0]) or {}
    flat = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
    moved = optimizer in _SIZES and _SIZES[optimizer] != sizes
    return bool(state) and (moved or any(isinstance(state.get(k), torch.Tensor) and state[k].numel() != flat
                                         for k in ("d", "prev_flat_grad")))


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
    clean is looked through again only when its parameter count changes, a layer is converted or
    resized, or its own state is loaded; one that passed only on such a gradient, at every step.
    Then its sparse layers' per-entry state must have their current size."""
    count = sum(len(group["params"]) for group in optimizer.param_groups)
    if _CHECKED.get(optimizer) == count:
        return
    taken = [p for g in optimizer.param_groups for p in g["params"] if hasattr(p, REPLACED)]
    name = next((getattr(p, REPLACED) for p in taken if p.grad is None or not p.grad.any()), None)
    if name is not None:
        raise ValueError(f"this {type(optimizer).__name__} holds the weights of {name!r} that sparsify took out of the "
                         "model, not its sparse layers, which would never train; build the optimizer after sparsify, "
                         "from ssvi_cli.param_groups(model, lr, lr_sigma) or model.parameters()")
    sparse = [p for g in optimizer.param_groups for p in g["params"] if p in _SPARSE]
    if isinstance(optimizer, torch.optim.LBFGS):
        if _lbfgs_misfit(optimizer, sizes := tuple(p.numel() for p in sparse)):
            raise OptimizerStateError(f"this LBFGS's direction and history are of its parameters before a sparse layer "
                                      f"changed size: {STATE_ADVICE}")
        _SIZES[optimizer] = sizes
    for p in sparse if not isinstance(optimizer, torch.optim.LBFGS) else ():
        if misfit := state_misfit(optimizer, p):
            raise OptimizerStateError(f"{_named(optimizer, p)} holds {p.numel()} entries, its {type(optimizer).__name__} "
                                      f"state {misfit[0]!r} {misfit[1]}: {STATE_ADVICE}")
    if not taken:
        if optimizer not in _WATCHED:  # an optimizer state loaded later may be of another support
            _WATCHED[optimizer] = optimizer.register_load_state_dict_post_hook(lambda opt: _CHECKED.pop(opt, None))
        _CHECKED[optimizer] = count
