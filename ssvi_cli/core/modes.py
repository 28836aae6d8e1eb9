"""How sparse layers compute, switched for the duration of a ``with`` block and then restored.

- :func:`sampling`: ``lrt`` (local reparameterisation, training), ``mean`` (θ = μ) or ``sample`` (one
  weight draw over the active entries per forward).
- :func:`capturing_dense_grad`: the forward runs through a dense leaf holding μ, so that backward
  yields ∂L/∂μ of the data term at every position (the addition score of a subspace step).
- :func:`drawing`: Monte Carlo prediction's per-layer draw state (buffers reused across draws).
- :func:`one_draw_per_forward`: a layer called twice in one forward reuses its weight draw.
- :func:`using_kernel`: a different kernel policy, e.g. to compare the sparse and dense products.

Each restores exactly what it changed, also when the block raises, so no caller leaves a model in
a state another caller does not expect.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterable, Iterator

from torch import nn

from ssvi_cli.core.kernels import KERNELS, KernelPolicy
from ssvi_cli.core.draws import DrawState
from ssvi_cli.core.layers import MODES, SparseGaussian, sparse_layers


def _layers(target: nn.Module | Iterable[SparseGaussian]) -> list[SparseGaussian]:
    if isinstance(target, nn.Module):
        return [layer for _, layer in sparse_layers(target)]
    return list(target)


@contextmanager
def _swap(layers: list[SparseGaussian], attr: str, values: list) -> Iterator[None]:
    previous = [getattr(layer, attr) for layer in layers]
    try:
        for layer, value in zip(layers, values):
            setattr(layer, attr, value)
        yield
    finally:
        for layer, value in zip(layers, previous):
            setattr(layer, attr, value)


def sampling(target: nn.Module | Iterable[SparseGaussian], mode: str):
    """Every sparse layer of ``target`` computes in ``mode`` inside the block."""
    if mode not in MODES:
        raise ValueError(f"unknown sampling mode {mode!r}; valid modes are: {', '.join(MODES)}")
    layers = _layers(target)
    return _swap(layers, "mode", [mode] * len(layers))


def capturing_dense_grad(target: nn.Module | Iterable[SparseGaussian], on: bool = True):
    """Dense-gradient capture for the layers that have off-support entries and are not frozen
    (``mu.requires_grad``; ``on=False``: a no-op)."""
    layers = _layers(target)
    return _swap(layers, "capture_dense_grad", [on and l.active < l.numel and l.mu.requires_grad for l in layers])


def drawing(layers: Iterable[SparseGaussian]):
    """A :class:`DrawState` for each Bayesian layer, for the ``sample``-mode calls in the block.

    Only for loops without gradients that consume each forward's result before the next one and call
    each layer once per forward, as Monte Carlo prediction does: a layer's output buffer is
    overwritten by its next call.
    """
    chosen = [layer for layer in layers if layer.bayesian]
    return _swap(chosen, "draws", [DrawState(layer) for layer in chosen])


@contextmanager
def one_draw_per_forward(target: nn.Module | Iterable[SparseGaussian]) -> Iterator[Callable[[], None]]:
    """In ``sample`` mode a layer called twice in one forward (shared weights) uses one weight draw
    for both calls, as one draw of theta would. The block gets a function that starts the next
    forward: call it before each one, and each layer's first call then draws afresh."""
    layers = [layer for layer in _layers(target) if layer.bayesian]
    boxes: list[list] = [[None] for _ in layers]

    def next_forward() -> None:
        for box in boxes:
            box[0] = None

    with _swap(layers, "forward_draw", boxes):
        yield next_forward


def using_kernel(target: nn.Module | Iterable[SparseGaussian], kernel: KernelPolicy | str):
    """Every sparse layer of ``target`` runs with the kernel policy ``kernel`` inside the block."""
    policy = KERNELS.get(kernel) if isinstance(kernel, str) else kernel
    layers = _layers(target)
    return _swap(layers, "kernel", [policy] * len(layers))


@contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """``model.eval()`` inside the block (BatchNorm on running statistics); afterwards every module
    is back in its own previous state (a BatchNorm frozen in eval inside a training model stays so)."""
    states = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in states:
            module.training = training
