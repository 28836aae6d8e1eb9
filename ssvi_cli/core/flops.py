"""Analytic FLOPs of training and Monte Carlo prediction, per layer and in total.

Convention (METHOD.md section 6; printed beside every number as :data:`CONVENTION`):

- One multiply-add counts as 2 FLOPs. A weight layer with ``n`` weights of which ``a`` are active,
  applied at ``p`` output positions per example (``p = 1`` for a linear layer, ``out_h * out_w`` for a
  convolution), costs ``2 * a * p`` FLOPs per example for one op over its weights.
- Deterministic forward: one op over the weights. Bayesian (LRT) forward: two ops, the mean
  ``op(x, mu)`` and the variance ``op(x^2, sigma^2)``, over the *active* weights only.
- Backward = 2 x forward (gradient of the input and of the weights), for every layer.
- SSVI adds a dense weight gradient (``2 * n * p`` per example, one op over *all* positions) on each
  minibatch whose gradient feeds the addition criterion: once per subspace step (``n`` per step with
  ``accumulate:n``), every ``delta_t`` steps while ``t < T_end`` (``delta_t = "auto"`` resolved as the
  trainer resolves it, :func:`ssvi_cli.core.subspace.resolve_delta_t`).
- Biases, BatchNorm, activations, pooling, noise draws and the optimizer update are not counted
  (they scale with activations or parameters, not with weight x position products).
- Monte Carlo prediction with ``S`` draws: a linear first layer's LRT moments once (two ops; a conv
  first layer samples its weights, one op per draw), then one op per draw in every deeper layer over
  its active weights (one weight sample per draw). That is the
  fewest multiply-adds; where noise draws cost more than products (large CPU batches, see
  ``prediction.first_layer_scheme``), prediction samples the first layer's weights too (S ops).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Optional, Sequence

import torch
from torch import nn

from ssvi_cli.config import MIN_SUBSPACE_STEPS
from ssvi_cli.core.layers import SparseGaussian, sparse_layers
from ssvi_cli.core.modes import capturing_dense_grad, sampling, using_kernel
from ssvi_cli.core.subspace import Schedule, end_step
from ssvi_cli.methods import METHODS, Method

CONVENTION = ("1 multiply-add = 2 FLOPs; LRT forward = 2 ops (mean, variance) over active weights; "
              "backward = 2x forward; SSVI adds a dense weight gradient (1 op over all weights) per "
              "subspace step; biases, BatchNorm, activations and the optimizer are not counted")


@dataclass(frozen=True)
class LayerGeometry:
    """What the count needs about one weight layer: its size and where it is applied."""

    name: str
    numel: int
    positions: int  # output positions per example (1 for linear layers)
    stem: bool = False
    first: bool = False

    def op(self, active: Optional[int] = None) -> int:
        """FLOPs per example of one op over ``active`` weights (all weights by default)."""
        return 2 * (self.numel if active is None else active) * self.positions


def model_geometry(model: nn.Module, input_shape: Sequence[int]) -> list[LayerGeometry]:
    """Output positions of every sparse layer, from one forward pass on a zero input of batch 1.

    The pass runs on a deep copy in ``mean`` mode with the dense kernel, so the caller's model, its
    modes and kernels are untouched; only shapes matter, so it runs on the meta device, allocating
    nothing (a file's header may name a huge input or layer), and on the CPU only for a model with
    an operation the meta device lacks. An MLP (``models.SSVIModel.vector_layers``) needs no pass:
    each of its layers applies once per example.
    """
    first = separate_first_layer(model)  # a linear one: its LRT moments are reused (a conv samples)
    if vector_model(model, input_shape):
        positions = {name: 1 for name, _ in sparse_layers(model)}
    else:
        positions = _probed_positions(model, input_shape)
    return [LayerGeometry(name, layer.numel, positions[name], layer.stem, layer is first and layer.is_linear())
            for name, layer in sparse_layers(model)]


def separate_first_layer(model: nn.Module) -> Optional[nn.Module]:
    """The first layer of a model that runs it apart from the rest (``prepare``, ``first``, ``forward_rest``, as
    every registered architecture), whose draws Monte Carlo prediction may take from its exact output
    moments; None for any other module (a torchvision or user network), whose every layer samples."""
    split = all(hasattr(model, part) for part in ("prepare", "first", "forward_rest"))  # SSVIModel's forward
    return model.first if split else None


def vector_model(model: nn.Module, input_shape: Sequence[int]) -> bool:
    """Whether ``model`` is an MLP (``models.SSVIModel.vector_layers``) built for inputs of
    ``input_shape``: it takes them, and each of its layers applies once per example, known without
    a probing forward (the first on the meta device in a process costs 1.5-2 s)."""
    return bool(getattr(model, "vector_layers", False)) and math.prod(input_shape) == model.first.weight_shape[1]


def _probed_positions(model: nn.Module, input_shape: Sequence[int]) -> dict[str, int]:
    positions: dict[str, int] = {}
    try:
        _probe(model, input_shape, positions, torch.device("meta"))
    except (NotImplementedError, RuntimeError):
        positions.clear()
        _probe(model, input_shape, positions, torch.device("cpu"))
    return positions


def _probe(model: nn.Module, input_shape: Sequence[int], positions: dict[str, int], device: torch.device) -> None:
    import copy

    probe = copy.deepcopy(model).to(device).eval()
    for name, layer in sparse_layers(probe):
        def hook(mod: SparseGaussian, _inp, out, name: str = name) -> None:
            positions[name] = out[0].numel() // mod.weight_shape[0]

        layer.register_forward_hook(hook)  # on the copy, dropped with it
    with torch.no_grad(), sampling(probe, "mean"), using_kernel(probe, "dense"), capturing_dense_grad(probe, False):
        probe(torch.zeros(1, *input_shape, device=device))


@dataclass(frozen=True)
class LayerFlops:
    """Per-example FLOPs of one layer for one method."""

    name: str
    numel: int
    active: int
    positions: int
    forward: int
    backward: int
    dense_grad: int  # extra FLOPs of one dense weight gradient (only on capture steps)

    @property
    def train(self) -> int:
        return self.forward + self.backward


def layer_flops(geom: LayerGeometry, active: int, bayesian: bool, moves_support: bool) -> LayerFlops:
    """Forward/backward FLOPs per example of ``geom`` with ``active`` weights (see module docstring)."""
    forward = (2 if bayesian else 1) * geom.op(active)
    dense_grad = geom.op() if moves_support and active < geom.numel else 0
    return LayerFlops(geom.name, geom.numel, active, geom.positions, forward, 2 * forward, dense_grad)


def _method(method: Method | str) -> Method:
    return METHODS.get(method) if isinstance(method, str) else method


def method_layers(geometry: Iterable[LayerGeometry], method: Method | str,
                  densities: Optional[dict[str, float]] = None) -> list[LayerFlops]:
    """Per-layer FLOPs for ``method`` (dense, vi, ssvi, static, rigl) at per-layer ``densities``.

    The dense methods (``dense``, ``vi``) ignore ``densities``; the sparse ones need a density per
    layer (the stem at 1.0 when it stays dense) and count ``round(density * n)`` active weights.
    """
    m = _method(method)
    rows = []
    for g in geometry:
        d = 1.0 if m.dense else (densities or {}).get(g.name)
        if d is None:
            raise KeyError(f"no density for layer {g.name!r}")
        rows.append(layer_flops(g, int(round(d * g.numel)), m.bayesian, m.moves_support))
    return rows


def subspace_captures(total_steps: int, delta_t: int, t_end: int, accumulate: int = 1) -> int:
    """Minibatches whose dense gradient is computed: ``accumulate`` per subspace step, the steps
    being every ``t`` in ``(0, t_end)`` with ``t % delta_t == 0``."""
    return Schedule(delta_t, 0.0, min(t_end, total_steps), accumulate).updates * accumulate


@dataclass(frozen=True)
class TrainingFlops:
    """Total analytic training FLOPs of one run (see :data:`CONVENTION`)."""

    method: str
    examples: int          # examples processed (epochs x training-set size)
    captures: int          # minibatches with a dense gradient
    batch_size: int
    per_example: int       # forward + backward per example
    dense_grad_total: int
    total: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def training_flops(layers: Sequence[LayerFlops], method: Method | str, examples: int, batch_size: int,
                   captures: int = 0) -> TrainingFlops:
    """``examples * sum(forward + backward) + captures * batch_size * sum(dense_grad)``."""
    per_example = sum(l.train for l in layers)
    dense = captures * batch_size * sum(l.dense_grad for l in layers)
    return TrainingFlops(_method(method).name, examples, captures, batch_size, per_example, dense,
                         examples * per_example + dense)


def recipe_flops(geometry: Sequence[LayerGeometry], method: Method | str, densities: Optional[dict[str, float]],
                 *, n_train: int, epochs: int, batch_size: int, delta_t: int | str, t_end: float,
                 accumulate: int = 1, min_subspace_steps: int = MIN_SUBSPACE_STEPS) -> TrainingFlops:
    """Training FLOPs of a whole recipe (``t_end`` as a fraction of the total steps; ``delta_t`` a
    number of steps or ``"auto"``)."""
    steps = math.ceil(n_train / batch_size) * epochs
    moves = _method(method).moves_support
    schedule = Schedule.fitted(delta_t, 0.0, end_step(t_end, steps), accumulate, min_subspace_steps)
    captures = schedule.updates * accumulate if moves else 0
    return training_flops(method_layers(geometry, method, densities), method, n_train * epochs,
                          batch_size, captures)


def prediction_flops(geometry: Sequence[LayerGeometry], densities: dict[str, float], bayesian: bool,
                     samples: int) -> list[dict[str, Any]]:
    """Per-layer FLOPs of one prediction (per example): MC with ``samples`` draws, or the mean net.

    Bayesian MC: a linear first layer's two LRT ops once, every other layer (a conv first layer too)
    one op per draw (the count for the moments scheme, see the module docstring).
    Deterministic or mean network: one op per layer.
    """
    rows = []
    for g in geometry:
        active = int(round(densities.get(g.name, 1.0) * g.numel))
        one = g.op(active)
        if not bayesian or samples <= 0:
            total = one
        elif g.first:
            total = 2 * one
        else:
            total = samples * one
        rows.append({"layer": g.name, "active": active, "weights": g.numel, "positions": g.positions,
                     "per_op": one, "flops": total})
    return rows


def training_summary(model: nn.Module, input_shape: Sequence[int], method: Method | str, *, examples: int,
                     batch_size: int, captures: int) -> dict[str, Any]:
    """The training-FLOPs entries of a run summary: this run's total, dense VI's on the same
    examples, and the reduction (dense VI / this run)."""
    geometry = model_geometry(model, input_shape)
    densities = {name: layer.density for name, layer in sparse_layers(model)}
    run = training_flops(method_layers(geometry, method, densities), method, examples, batch_size, captures)
    vi = training_flops(method_layers(geometry, "vi"), "vi", examples, batch_size)
    return {"training_flops": run.total, "training_flops_dense_vi": vi.total,
            "training_flops_reduction_vs_vi": vi.total / run.total if run.total else None,
            "flops_convention": CONVENTION}
