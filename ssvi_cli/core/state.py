"""Filling a module from a plain dict of tensors (a model file's, a checkpoint's, trained weights),
finding the module inside the wrappers a training loop puts around it, and reading how far an
optimizer's state has come."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Mapping

import torch
from torch import Tensor, nn


def load_tensors(model: nn.Module, state: Mapping[str, Tensor]) -> Any:
    """``model.load_state_dict(state, strict=False)``, its missing and unexpected keys returned.

    A state dict carries each module's version (``state_dict()._metadata``), which some modules'
    loaders read: torchvision's MNASNet refuses a state without one. A file's or a checkpoint's
    tensors come as a plain dict, written by the code that builds ``model``: they are given the
    model's own versions. A state that has its own (``torch.load`` of a ``state_dict()``) keeps them.
    """
    if getattr(state, "_metadata", None) is None:
        versions = getattr(model.state_dict(keep_vars=True), "_metadata", None)
        state = OrderedDict(state)
        if versions is not None:
            state._metadata = versions  # type: ignore[attr-defined]
    return model.load_state_dict(state, strict=False)


PARALLEL = (nn.DataParallel, nn.parallel.DistributedDataParallel)  # wrappers that hold the model as .module


def wrapper_chain(model: nn.Module) -> list[nn.Module]:
    """``model``, then each module it wraps (torch.compile's ``_orig_mod``, (Distributed)DataParallel's
    ``module``): the last is the plain model."""
    chain = [model]
    while True:
        inner = getattr(chain[-1], "_orig_mod", None)  # torch.compile's OptimizedModule
        if not isinstance(inner, nn.Module) and isinstance(chain[-1], PARALLEL):
            inner = chain[-1].module
        if not isinstance(inner, nn.Module):
            return chain
        chain.append(inner)


def support_problem(numel: int, idx: Any, mu: Any = None, rho: Any = None) -> str:
    """What makes ``idx`` (with ``mu`` and ``rho``, where given) no support of a layer of ``numel``
    weights, or "": a 1-D integer tensor of strictly increasing positions below ``numel``, and values
    as many (``mu`` finite). An index out of range would send the sparse kernels outside the weight (a
    crash, or values read from elsewhere)."""
    if not isinstance(idx, Tensor) or idx.dim() != 1 or idx.is_floating_point() or idx.is_complex() \
            or idx.dtype == torch.bool:
        return "not a 1-D tensor of integer positions"
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= numel or not bool((idx[1:] > idx[:-1]).all())):
        return f"not a sorted set of distinct positions below {numel}"
    for what, values in (("mu", mu), ("rho", rho)):
        if values is not None and (not isinstance(values, Tensor) or not values.is_floating_point()
                                   or tuple(values.shape) != tuple(idx.shape)):
            return f"{what} is not {idx.numel()} floating-point values, one per position"
    for what, values in (("mu", mu), ("rho", rho)):  # (a diverged run's checkpoint, a damaged file)
        if isinstance(values, Tensor) and not bool(torch.isfinite(values).all()):
            return f"{what} holds non-finite values"
    return ""


def optimizer_steps(optimizer: torch.optim.Optimizer) -> int:
    """The steps an optimizer's state records: Adam's or RMSprop's ``step`` count; -1 where it holds
    state without a count (SGD's momentum buffers); 0 for one that has not stepped (or keeps no state:
    plain SGD)."""
    counts = [int(state["step"]) if "step" in state else -1 for state in optimizer.state.values() if state]
    return max(counts) if counts and max(counts) > 0 else (-1 if counts else 0)
