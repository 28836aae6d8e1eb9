"""The subspace step (remove low-score entries, add high-gradient ones) and its schedule.

METHOD.md section 4: every ``delta_t`` steps while ``t < t_end`` the step replaces the parameter update.
The drop fraction follows ``f(t) = alpha/2 (1 + cos(pi t / t_end))``; in every layer the active count
is unchanged, exactly. ``delta_t = "auto"`` fits the spacing to the run's length
(:func:`resolve_delta_t`), for the trainer and the public loop API alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from ssvi_cli.config import DELTA_T_AUTO, MIN_SUBSPACE_STEPS, PAPER_DELTA_T, SparseConfig, addition_accumulate
from ssvi_cli.core.criteria import ranking_score, top_k_indices
from ssvi_cli.core.layers import SparseGaussian, sparse_layers
from ssvi_cli.core.gaussian import rho_from_sigma
from ssvi_cli.core.replaced import STATE_ADVICE, OptimizerStateError, state_misfit  # noqa: F401 - re-exported

NEW_SIGMA_TINY = 1e-6
# Optimizers of torch.optim whose state per parameter is tensors of the parameter's shape (reset
# entry by entry for new weights) plus scalars; anything else cannot be reset safely.
RESETTABLE_OPTIMIZERS = ("SGD", "Adam", "AdamW", "Adamax", "NAdam", "RAdam", "RMSprop", "Adagrad",
                         "Adadelta", "ASGD")


def check_optimizer_kind(optimizer: torch.optim.Optimizer) -> None:
    """One of :data:`RESETTABLE_OPTIMIZERS` (or a subclass of one), or OptimizerStateError."""
    if not isinstance(optimizer, resettable := tuple(getattr(torch.optim, n) for n in RESETTABLE_OPTIMIZERS)):
        if isinstance(inner := getattr(optimizer, "optimizer", None), resettable):  # Accelerate's wrapper, say
            raise OptimizerStateError(
                f"{type(optimizer).__name__} wraps torch.optim.{type(inner).__name__}: give Subspace the optimizer it wraps "
                "(its .optimizer), and under gradient accumulation call subspace.step() only on the steps the "
                "wrapper would take (Accelerate: where accelerator.sync_gradients is True; docs/API.md, Frameworks)")
        raise OptimizerStateError(
            f"{type(optimizer).__name__} keeps state the remove-and-add step cannot reset entry by entry; use "
            f"one of torch.optim's {', '.join(RESETTABLE_OPTIMIZERS)} (or a subclass of one)")


def check_resettable(optimizer: torch.optim.Optimizer, layers: list[SparseGaussian]) -> None:
    """Each per-parameter state tensor of the layers' μ and ρ must be re-indexable with the support:
    the parameter's shape (a moment, a momentum buffer) or one number (a step count). Anything else
    (a subclass's own state of another shape) is refused before any layer changes."""
    for layer in layers:
        for p in (q for q in (layer.mu, layer.rho) if q is not None):
            for key, value in (optimizer.state.get(p) or {}).items():
                if isinstance(value, Tensor) and value.shape != p.shape and value.numel() > 1:
                    raise OptimizerStateError(
                        f"{type(optimizer).__name__}'s state {key!r} has shape {tuple(value.shape)}, not its "
                        f"parameter's {tuple(p.shape)}: a remove-and-add step cannot reset it entry by entry")


def check_optimizer_holds(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Every trainable sparse layer's mu and rho are among the optimizer's parameters (an optimizer
    built before ``sparsify`` holds the replaced dense weights, and the model would never train);
    frozen ones (``requires_grad`` off) may be left out."""
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for name, layer in sparse_layers(model):
        for part, param in (("mu", layer.mu), ("rho", layer.rho)):
            if param is not None and param.requires_grad and id(param) not in held:
                raise ValueError(f"the optimizer does not hold {name}.{part}; build it after ssvi_cli.sparsify, "
                                 "from ssvi_cli.param_groups(model, lr, lr_sigma) or model.parameters()")


def check_state_fits(optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
    """Each sparse layer's μ and ρ must have as many entries as the optimizer's per-entry state of
    them (a moment, a momentum buffer): ``ssvi_cli.load`` or ``load_state_dict`` into a model that an
    optimizer already stepped resizes the layers, and the optimizer's state then belongs to the old
    support (torch would fail with a bare size mismatch inside the optimizer)."""
    for name, layer in sparse_layers(model):
        for part, p in (("mu", layer.mu), ("rho", layer.rho)):
            if p is not None and (misfit := state_misfit(optimizer, p)):
                raise OptimizerStateError(f"{name}.{part} holds {p.numel()} entries, its {type(optimizer).__name__} "
                                          f"state {misfit[0]!r} {misfit[1]}: {STATE_ADVICE}")


def resolve_delta_t(delta_t: int | str, t_end: int, min_steps: int, accumulate: int = 1) -> int:
    """The minibatches between subspace steps: ``delta_t`` itself, or for ``"auto"``
    ``clamp(floor((t_end - 1) / min_steps), accumulate + 1, 100)``.

    The subspace steps are the ``t`` in ``(0, t_end)`` with ``t % delta_t == 0``, so
    ``floor((t_end - 1) / min_steps)`` is the widest spacing that still fits ``min_steps`` of them: a
    short run gets at least ``min_steps`` (all its ``t_end`` steps allow), a run with
    ``t_end > 100 * min_steps`` exactly the paper's 100. Never below ``accumulate + 1``: the
    gradients of the ``accumulate`` minibatches before a subspace step feed it, and a schedule made
    of subspace steps only would never update the weights.
    """
    if isinstance(delta_t, bool) or (not isinstance(delta_t, int) and delta_t != DELTA_T_AUTO):
        raise ValueError(f"delta_t={delta_t!r}; use a positive number of steps or {DELTA_T_AUTO!r}")
    if min_steps < 1:
        raise ValueError(f"min_subspace_steps must be positive, got {min_steps}")
    if isinstance(delta_t, int):
        if delta_t < 1:
            raise ValueError(f"delta_t must be positive, got {delta_t}")
        return delta_t
    return min(PAPER_DELTA_T, max(accumulate + 1, (t_end - 1) // min_steps))


OVERLAP_RECORDS = 10  # subspace steps of a run that record the criteria overlap (Schedule.records_overlap)


def largest_moving(model: nn.Module) -> int:
    """The most active entries of a sparse layer of ``model`` whose support moves (not kept dense):
    :meth:`Schedule.records_overlap`'s ``largest``; 0 when none moves."""
    return max((l.active for _, l in sparse_layers(model) if l.active < l.numel), default=0)


def end_step(t_end: float, total_steps: int) -> int:
    """The step from which the support is frozen, ``floor(t_end * total_steps)``, with ``t_end`` read as
    the decimal it is written as: in binary floating point 0.57 * 100 is 56.99999999999999."""
    return math.floor(Fraction(repr(float(t_end))) * int(total_steps))


@dataclass(frozen=True)
class Schedule:
    delta_t: int
    alpha: float
    t_end: int          # the global step from which the support is frozen (end_step of the config's fraction)
    accumulate: int = 1  # minibatches whose dense gradients feed the addition score

    @classmethod
    def fitted(cls, delta_t: int | str, alpha: float, t_end: int, accumulate: int = 1,
               min_steps: int = MIN_SUBSPACE_STEPS) -> "Schedule":
        """A schedule whose ``delta_t`` may be ``"auto"`` (see :func:`resolve_delta_t`)."""
        return cls(resolve_delta_t(delta_t, t_end, min_steps, accumulate), alpha, t_end, accumulate)

    @classmethod
    def from_config(cls, sparse: SparseConfig, total_steps: int) -> "Schedule":
        """The schedule of a run of ``total_steps`` minibatches (``t_end`` a fraction of them)."""
        return cls.fitted(sparse.delta_t, sparse.alpha, end_step(sparse.t_end, total_steps),
                          addition_accumulate(sparse.addition), sparse.min_subspace_steps)

    @property
    def updates(self) -> int:
        """The number of subspace steps: every ``t`` in ``(0, t_end)`` with ``t % delta_t == 0``."""
        return max(0, (self.t_end - 1) // self.delta_t)

    def is_update(self, t: int) -> bool:
        return t > 0 and t % self.delta_t == 0 and t < self.t_end

    def captures(self, t: int) -> bool:
        """Whether step ``t`` records the dense gradient (the update step and the n-1 before it)."""
        nxt = ((t + self.delta_t - 1) // self.delta_t) * self.delta_t
        return self.is_update(nxt) and nxt - t < self.accumulate

    def records_overlap(self, t: int, largest: int, most: int = 0) -> bool:
        """Whether subspace step ``t`` records how far the removal criteria agree (``core.overlap``):
        at most ``most`` (default :data:`OVERLAP_RECORDS`, at least 2) of the run's subspace steps that
        drop any entry, spread evenly from the first to the last of them (every one in a run of
        fewer). ``largest``: the most active entries of a layer that moves; late in a long run the drop
        fraction rounds to no entry even there, and a step that drops none records nothing (every IoU
        would read 1). Scoring six criteria over every layer takes about half as long again as the
        step itself: a record at each of a long run's hundreds of steps would be paid by every run."""
        most = max(2, most or OVERLAP_RECORDS)
        n, i = self.last_dropping(largest), t // self.delta_t
        if not 1 <= i <= n:
            return False
        return n <= most or i in {1 + round(j * (n - 1) / (most - 1)) for j in range(most)}

    def last_dropping(self, largest: int) -> int:
        """The number of the last subspace step (1, 2, ...) at which a layer of ``largest`` active
        entries drops one, ``floor(f(t) * largest) >= 1`` (as :func:`update_layer` counts); 0 if
        none does. The drop fraction only falls, so the steps that drop are the first ones."""
        n = self.updates
        while n > 0 and math.floor(self.drop_fraction(n * self.delta_t) * largest) < 1:
            n -= 1
        return n

    def drop_fraction(self, t: int) -> float:
        if self.t_end <= 0:
            return 0.0
        return self.alpha / 2 * (1 + math.cos(math.pi * min(t, self.t_end) / self.t_end))


@dataclass
class LayerSwap:
    name: str
    active: int
    dropped: int      # entries chosen for removal (some may be re-added)
    swapped: int      # entries new to the support
    iou: float        # |old & new| / |old | new|


@dataclass
class SwapReport:
    step: int
    fraction: float
    layers: list[LayerSwap] = field(default_factory=list)
    skipped: bool = False  # a dense gradient held inf/NaN (an fp16 overflow): no layer was changed
    unreached: list[str] = field(default_factory=list)  # layers the step's backward did not reach: kept as they were

    @property
    def swapped(self) -> int:
        return sum(l.swapped for l in self.layers)

    def __repr__(self) -> str:  # a summary: the dataclass's own printed every layer's on one line (.layers has them)
        return (f"SwapReport(step={self.step}, fraction={self.fraction:.4f}, swapped={self.swapped:,} in "
                f"{len(self.layers)} layer{'' if len(self.layers) == 1 else 's'}, skipped={self.skipped}, unreached={self.unreached})")


def update_layer(name: str, layer: SparseGaussian, add_score: Tensor, fraction: float,
                 criterion: str, lam: float, new_sigma: str,
                 optimizer: Optional[torch.optim.Optimizer]) -> LayerSwap:
    """Remove the ``floor(f k)`` lowest removal scores, add as many by ``add_score``, in place."""
    k = layer.active
    drop = int(math.floor(fraction * k))
    if drop == 0 or k == layer.numel:
        return LayerSwap(name, k, 0, 0, 1.0)
    with torch.no_grad():
        old_idx = layer.idx
        sigma = layer.sigma() if layer.bayesian else torch.zeros_like(layer.mu)
        keep_score = ranking_score(criterion if layer.bayesian else "mean", layer.mu, sigma, lam)
        # Ties go to the lower index in both selections, so every process picks the same entries.
        keep_pos = top_k_indices(keep_score, k - drop)
        kept = old_idx[keep_pos]
        candidates = add_score.detach().abs().flatten()  # a new tensor: the gradient is untouched
        candidates[kept] = -math.inf
        added = top_k_indices(candidates, drop)
        new_idx = torch.cat([kept, added]).sort().values
        pos = torch.searchsorted(old_idx, new_idx).clamp_max(k - 1)
        found = old_idx[pos] == new_idx
        src = pos[found]

        def carry(old: Tensor, fill: Tensor | float) -> Tensor:
            new = torch.empty_like(old)
            if isinstance(fill, Tensor):
                new[:] = fill
            else:
                new.fill_(fill)
            new[found] = old[src]
            return new

        new_mu = carry(layer.mu.detach(), 0.0)
        new_rho = None
        if layer.bayesian:
            if new_sigma == "tiny":
                fill = rho_from_sigma(torch.tensor(NEW_SIGMA_TINY), layer.sigma_param).to(layer.rho)
            else:
                kept_rho = layer.rho.detach()[keep_pos] if drop < k else layer.rho.detach()  # none kept (f = 1)
                fill = kept_rho.mean()
            new_rho = carry(layer.rho.detach(), fill)
        if optimizer is not None:
            for p in (layer.mu, layer.rho):
                state = optimizer.state.get(p) if p is not None else None
                for key, value in (state or {}).items():
                    if isinstance(value, Tensor) and value.shape == p.shape:
                        state[key] = carry(value, 0.0)  # new entries start with zero momentum
        layer.set_support(new_idx, new_mu, new_rho)
        swapped = int((~found).sum())
        inter = k - swapped
    return LayerSwap(name, k, drop, swapped, inter / (2 * k - inter))


def subspace_step(model: nn.Module, step: int, schedule: Schedule, criterion: str, lam: float,
                  new_sigma: str, optimizer: Optional[torch.optim.Optimizer],
                  reduce: Optional[Callable[[Tensor], Tensor]] = None) -> SwapReport:
    """Apply one subspace step to every sparse layer using the gradients they captured.

    ``reduce`` (e.g. an all-reduce mean across processes) is applied to each dense gradient first,
    so that every process ranks the same scores. When any (reduced) gradient holds inf or NaN, as
    after an overflow of fp16's scaled backward, no layer changes and the report says ``skipped``:
    the step is dropped, as a gradient scaler drops an optimizer step (every process agrees, since
    the check runs on the reduced gradients).

    A frozen layer (``mu.requires_grad`` off) keeps its support. A layer without a dense gradient
    (the step's forward did not use it: a head of another task, a branch not taken) keeps it too and
    is listed in ``unreached``. Under ``reduce`` every process must reach the same layers, so there a
    missing gradient is an error.
    """
    fraction = schedule.drop_fraction(step)
    report = SwapReport(step, fraction)
    grads: list[tuple[str, SparseGaussian, Tensor]] = []
    for name, layer in sparse_layers(model):
        if layer.active == layer.numel or not layer.mu.requires_grad:  # dense, or frozen by the user
            continue
        grad = layer.dense_grad
        if grad is None:
            if reduce is not None:
                raise RuntimeError(f"layer {name} has no dense gradient for the subspace step; under distributed "
                                   "training every process's step must reach every sparse layer")
            report.unreached.append(name)
            continue
        grads.append((name, layer, reduce(grad) if reduce is not None else grad))
        layer.dense_grad = None
    report.skipped = not all(bool(torch.isfinite(g).all()) for _, _, g in grads)
    if not report.skipped:
        if optimizer is not None:
            check_resettable(optimizer, [layer for _, layer, _ in grads])
        for name, layer, grad in grads:
            report.layers.append(update_layer(name, layer, grad, fraction, criterion, lam, new_sigma, optimizer))
    return report


def collect_captured(model: nn.Module, accumulate: dict[str, Tensor], count: int,
                     loss_scale: float = 1.0, drop_nonfinite: bool = False) -> bool:
    """Move each layer's captured dense gradient into a running mean over ``count`` minibatches.

    ``loss_scale`` (fp16 training) divides out the gradient scaler's factor, which may differ between
    the accumulated minibatches; ``mu.grad`` (autograd's) stays scaled, as the scaler expects. With
    ``drop_nonfinite`` a minibatch whose dense gradient overflowed (an fp16 step the scaler skips,
    before the remove-and-add step) is left out of the mean: False then, and ``count`` is not its.
    """
    grads = {}
    for name, layer in sparse_layers(model):
        if layer.capture_dense_grad and (grad := layer.collect_dense_grad()) is not None:
            grads[name] = (layer, grad / loss_scale if loss_scale != 1.0 else grad)
    if drop_nonfinite and not all(bool(torch.isfinite(grad).all()) for _, grad in grads.values()):
        for name, (layer, _) in grads.items():
            layer.dense_grad = accumulate.get(name)
        return False
    for name, (layer, grad) in grads.items():
        prev = accumulate.get(name)
        accumulate[name] = grad.clone() if prev is None else prev + (grad - prev) / count
        layer.dense_grad = accumulate[name]
    return True
