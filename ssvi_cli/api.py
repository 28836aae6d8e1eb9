"""SSVI in your own training loop: optimizer groups, the subspace schedule as one object, prediction
with uncertainty: the ``ssvi train`` recipe's pieces (its trainer runs the same core steps, and warms
the KL term up: docs/API.md), for any model whose layers ``sparsify`` made sparse Gaussian layers::

    optimizer = torch.optim.SGD(ssvi_cli.param_groups(model, lr=0.01, lr_sigma=0.01), momentum=0.9)
    subspace = ssvi_cli.Subspace(model, optimizer, total_steps=len(loader) * epochs)
    for x, y in loader:
        loss = F.cross_entropy(model(x), y) + ssvi_cli.kl_term(model, n_train=len(dataset), beta=0.01)
        loss.backward()
        subspace.step()        # the optimizer step, or every delta_t steps a remove-and-add step
        optimizer.zero_grad()
    out = ssvi_cli.predict(model, x, samples=30)      # probs, entropy, mutual information

The whole example, run on the embedded digits, is docs/API.md (and a test).
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import replace
from typing import Any, Optional

import torch
from torch import nn

from ssvi_cli.argcheck import real, whole
from ssvi_cli.config import Config, ConfigError, SparseConfig as S, validate
from ssvi_cli.core.convert import unfilled
from ssvi_cli.core.criteria import REMOVAL_CRITERIA
from ssvi_cli.core.hooks import ATTACHED, Hook, rank_mean
from ssvi_cli.core.layers import sparse_layers
from ssvi_cli.core.modes import capturing_dense_grad, sampling
from ssvi_cli.core.replaced import name_layers
from ssvi_cli.core.state import optimizer_steps
from ssvi_cli.core.subspace import (RESETTABLE_OPTIMIZERS, OptimizerStateError, Schedule, SwapReport,  # noqa: F401
                                   check_optimizer_holds, check_optimizer_kind, check_state_fits, collect_captured,
                                   end_step, subspace_step)
from ssvi_cli.interrupts import uninterrupted
from ssvi_cli.prediction import Prediction, predict  # re-exported: the public loop pieces in one place
from ssvi_cli.training.optim import kl_term, param_groups

log = logging.getLogger(__name__)


_Hook = Hook  # the name by which earlier versions pickled a Subspace's hooks with a whole model or optimizer
# Optimizers a Subspace is stepping right now (its step() calls optimizer.step()): any other step of
# them is the loop's own.
_STEPPING: "weakref.WeakSet[torch.optim.Optimizer]" = weakref.WeakSet()


class Subspace:
    """The SSVI schedule for a user's loop: call :meth:`step` where ``optimizer.step()`` would go.

    Every ``delta_t`` steps while ``t < t_end * total_steps`` the step is a remove-and-add step instead
    (METHOD.md §4; ``t`` counts steps from 0: the first is the call at ``t == delta_t``); ``delta_t="auto"``
    spaces them to give at least ``min_subspace_steps`` of them, at most 100 steps apart
    (``ssvi_cli.core.subspace.resolve_delta_t``; the value used is ``self.schedule.delta_t``): the minibatch
    just before it ran with dense-gradient capture (switched on for that forward only, by a forward pre-hook),
    the lowest removal scores are dropped and as many positions with the largest |dL/dmu| added, every layer's
    active count unchanged. The optimizer's state of new entries is reset to zero (a Ctrl-C during the step
    takes effect once it is done whole); ``state_dict``/``load_state_dict`` resume the schedule.

    A model has one Subspace at a time: a new one replaces the old, whose ``step()`` then refuses.
    ``optimizer.step()`` called by the loop itself is a plain step and trains mu as usual; when the
    forward before it had captured the dense gradient for a remove-and-add step (say, the loop left
    the schedule after early stopping), that remove-and-add step is skipped, with a warning.
    :meth:`remove` ends the schedule. A step past ``total_steps`` is a plain step, with a warning at
    the first (the schedule was fitted to a shorter run).

    Under ``DistributedDataParallel`` pass the wrapped model: its capture step then runs without
    DDP's synchronisation and the dense gradients are averaged across ranks before scoring, so every
    rank picks the same support. Under autocast nothing changes; with a ``GradScaler`` call
    ``step(scaler)``.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, total_steps: int, *,
                 delta_t: int | str = S.delta_t, alpha: float = S.alpha, t_end: float = S.t_end,  # the sparse.* defaults
                 criterion: str = S.criterion, criterion_lambda: float = S.criterion_lambda, addition: str = S.addition,
                 new_sigma: str = S.new_sigma, min_subspace_steps: int = S.min_subspace_steps) -> None:
        if not isinstance(model, nn.Module) or not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"Subspace(model, optimizer, total_steps) takes an nn.Module and a torch.optim optimizer, "
                            f"got {type(model).__name__} and {type(optimizer).__name__}")
        if not sparse_layers(model):
            raise ValueError("the model has no sparse Gaussian layers; convert it with ssvi_cli.sparsify first")
        unfilled(model, "train it")
        check_optimizer_kind(optimizer)
        if addition not in ("sample", "mean"):
            raise ValueError(f"addition={addition!r}; valid values are: sample, mean (accumulate:N is ssvi train's)")
        if whole("total_steps", total_steps) < 1:
            raise ValueError(f"total_steps must be positive, got {total_steps}")
        # Checked now, as ssvi train checks its config: the first remove-and-add step may be 100 steps away.
        REMOVAL_CRITERIA.get(criterion)
        alpha, t_end, criterion_lambda = real("alpha", alpha), real("t_end", t_end), real("criterion_lambda", criterion_lambda)
        min_subspace_steps, total_steps = whole("min_subspace_steps", min_subspace_steps), int(total_steps)
        if not isinstance(delta_t, str):
            delta_t = whole("delta_t", delta_t)
        base = Config()
        try:
            validate(replace(base, sparse=replace(base.sparse, delta_t=delta_t, alpha=alpha, t_end=t_end,
                                                  criterion=criterion, criterion_lambda=criterion_lambda,
                                                  new_sigma=new_sigma, min_subspace_steps=min_subspace_steps)))
        except ConfigError as exc:  # named as the argument, not the config key
            raise ValueError(str(exc).removeprefix("sparse.")) from None
        check_optimizer_holds(model, optimizer)
        self.model, self.optimizer = model, optimizer
        self.schedule = Schedule.fitted(delta_t, alpha, end_step(t_end, total_steps), min_steps=min_subspace_steps)
        self.criterion, self.criterion_lambda, self.new_sigma, self.addition = criterion, criterion_lambda, new_sigma, addition
        self.t, self.total_steps = 0, total_steps
        self.last_report: Optional[SwapReport] = None
        self._told: set[tuple[str, ...]] = set()  # the sets of unreached layers already warned about
        self._capture: Optional[Any] = None  # the capture context, open from the first capture forward to step()
        self._forward_only: Optional[Any] = None
        self._unsynced: Optional[nn.parallel.DistributedDataParallel] = None
        self._dropped_at: Optional[int] = None  # the step whose capture went to the loop's own optimizer step
        self._forwards: set[bool] = set()  # the training flags of the model's forwards since the last step()
        self._plain_steps = 0  # the loop's own optimizer steps since the last step()
        self._removed = self._told_eval = self._told_idle = self._told_plain = self._told_past = False  # (warnings once)
        self._hooks = [model.register_forward_pre_hook(Hook(self._before_forward)),
                       model.register_forward_hook(Hook(self._after_forward)),
                       optimizer.register_step_pre_hook(Hook(self._before_optimizer_step))]
        name_layers(optimizer, model)  # the global step pre-hook's refusals then name this model's layers
        key = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
        previous = ATTACHED.get(key)
        previous = previous() if previous is not None else None
        if previous is not None and not previous._removed:
            log.warning("this model already had a Subspace: the new one replaces it (the old one is removed)")
            previous.remove()
        ATTACHED[key] = weakref.ref(self)
        if self.schedule.updates == 0:
            log.warning("Subspace: no remove-and-add step fits before t_end (step %d of %d) at delta_t=%d, so the "
                        "support never moves%s", self.schedule.t_end, total_steps, self.schedule.delta_t,
                        "" if delta_t == "auto" else "; pass a smaller delta_t, or delta_t='auto'")

    def _before_forward(self, module: nn.Module, args: Any) -> None:
        self._forwards.add(module.training)
        if not (module.training and self.schedule.captures(self.t)) or self._dropped_at == self.t:
            return
        if self._capture is None:
            # Kept until step(): every forward until then (the micro-batches of an accumulating
            # loop) adds to the captured dense gradient.
            self._capture = capturing_dense_grad(self.model)
            self._capture.__enter__()
        if isinstance(module, nn.parallel.DistributedDataParallel):
            # No gradient synchronisation for any forward of the capture step: no optimizer step
            # follows, mu's gradient comes from the dense leaf DDP cannot see, and step() averages
            # the dense gradients across ranks itself. Set per forward, not by entering no_sync():
            # a loop's own no_sync() around earlier micro-batches would switch sync back on for the
            # last one when it exits. step() switches it back on.
            module.require_backward_grad_sync = False
            self._unsynced = module
        if self.addition == "mean" and self._forward_only is None:  # each capture forward's sampling mode
            self._forward_only = sampling(self.model, "mean")
            self._forward_only.__enter__()

    def _after_forward(self, module: nn.Module, args: Any, output: Any) -> None:
        if self._forward_only is not None:
            self._forward_only.__exit__(None, None, None)
            self._forward_only = None

    def _before_optimizer_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if optimizer in _STEPPING:  # (the state's fit is checked by every optimizer's own pre-hook: core.replaced)
            return
        self._plain_steps += 1
        ahead = (self.t // self.schedule.delta_t + 1) * self.schedule.delta_t < self.schedule.t_end  # a swap to come
        if self._plain_steps == self.schedule.delta_t and ahead and not self._told_plain:
            self._told_plain = True  # a whole period of the loop's own steps: step() is not being called
            log.warning("optimizer.step() ran %d times since the last Subspace.step(): the schedule stays at step %d "
                        "and the support does not move; call subspace.step() in place of optimizer.step(), or "
                        "subspace.remove() to leave the schedule", self._plain_steps, self.t)
        if self._capture is None:
            return
        # The loop stepped the optimizer itself after a capture forward (it left the schedule, say
        # after early stopping): mu has its gradient from autograd; the dense one is dropped, and so
        # is this remove-and-add step. Later forwards at this t do not capture, so a loop that goes
        # on without step() trains as a plain one.
        self._close_capture(average=True)
        self._dropped_at = self.t
        log.warning("optimizer.step() ran outside Subspace.step() after the forward of remove-and-add step %d: "
                    "that step is skipped (call subspace.step() in place of optimizer.step() to keep the schedule)",
                    self.t)

    def _close_capture(self, average: bool) -> None:
        """Leave capture mode, dropping any captured dense gradient not yet collected; switch DDP's
        gradient synchronisation back on, and (``average``: an optimizer step follows) average the
        gradients that the capture backward left unsynchronised."""
        if self._capture is not None:
            for _, layer in sparse_layers(self.model):
                if layer.capture_dense_grad:
                    layer.drop_captured()
            self._capture.__exit__(None, None, None)
            self._capture = None
        if self._unsynced is not None:
            if average and torch.distributed.is_available() and torch.distributed.is_initialized():
                for param in self._unsynced.module.parameters():
                    if param.grad is not None:
                        param.grad.copy_(rank_mean(param.grad))
            self._unsynced.require_backward_grad_sync = True
            self._unsynced = None

    def step(self, scaler: Optional[torch.amp.GradScaler] = None) -> bool:
        """The optimizer step, or the remove-and-add step in its place; returns True for the latter.

        With mixed precision pass the ``GradScaler``: ``step(scaler)`` then stands for
        ``scaler.step(optimizer); scaler.update()``, and the captured gradients are unscaled. A
        remove-and-add step whose dense gradient overflowed changes nothing (``last_report.skipped``)
        and backs the scale off, as the scaler does for a skipped optimizer step; that overflow alone
        moves the scale on such a step (one scale on every rank under DDP)."""
        if scaler is not None and not callable(getattr(scaler, "get_scale", None)):  # step(optimizer), say
            raise TypeError(f"step() takes mixed precision's GradScaler, or nothing; not a {type(scaler).__name__}")
        if self._removed:
            raise RuntimeError("this Subspace was removed (by remove(), or replaced by a newer Subspace on the same "
                               "model); step the newer one, or the optimizer")
        if self._forwards == {False} and not self._told_eval:  # a validation pass ran, no training one
            self._told_eval = True
            log.warning("Subspace.step() after forwards in eval() mode only: a remove-and-add step takes its dense "
                        "gradient from a train() forward, so the next one will fail; call model.train() before training")
        check_state_fits(self.optimizer, self.model)
        if self.t == 0 and (taken := optimizer_steps(self.optimizer)):  # a checkpoint's optimizer, not its schedule
            log.warning("Subspace.step() at the schedule's step 0 with an optimizer that has stepped before (%s): a loop resumed "
                        "from a checkpoint restores the schedule too (subspace.load_state_dict(saved)), or it starts again",
                        f"its state at step {taken}" if taken > 0 else "its momentum buffers")
        forwards, self._forwards, self._plain_steps = self._forwards, set(), 0
        if not forwards and not self._told_idle:  # its model made again (a re-run notebook cell), say: nothing trains
            self._told_idle = True
            log.warning("Subspace.step() after no forward of the model this Subspace was given: the step goes to that "
                        "model's optimizer; a model made again needs its own optimizer and Subspace, and a forward "
                        "calls the model itself (model(x)), not its submodules")
        update = self.schedule.is_update(self.t) and self._dropped_at != self.t
        with uninterrupted(update):  # a remove-and-add step, t's advance included, whole or not at all
            captured = self._capture is not None
            if captured:
                scale = float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0
                collect_captured(self.model, {}, 1, scale)
            # No averaging: an update step's dense gradients are averaged by subspace_step, and DDP's
            # switch is set back outside no_sync(), as DDP's own state.
            self._close_capture(average=False)
            if update:
                if not captured and not forwards:
                    raise RuntimeError("no dense gradient for the subspace step: the model given to Subspace ran no forward "
                                       "since the last step; call that model (model(x)), not its submodules or another "
                                       "method, for the step's forward, then backward, then Subspace.step() (a model made "
                                       "again needs its own optimizer and Subspace)")
                if not captured:
                    raise RuntimeError("no dense gradient for the subspace step: run the step's forward and "
                                       "backward with the model in train() mode before Subspace.step()")
                reduce = rank_mean if torch.distributed.is_available() and torch.distributed.is_initialized() else None
                self.last_report = subspace_step(self.model, self.t, self.schedule, self.criterion,
                                                 self.criterion_lambda, self.new_sigma, self.optimizer, reduce)
                unreached = tuple(self.last_report.unreached)
                if unreached and unreached not in self._told:  # once per set of layers: a multi-task loop repeats it
                    self._told.add(unreached)
                    none = not self.last_report.layers and not self.last_report.skipped  # no layer had a gradient
                    log.warning("Subspace step %d: %s got no gradient from this step's %s and kept their supports "
                                "(see last_report.unreached)", self.t, ", ".join(unreached),
                                "backward (was loss.backward() called before subspace.step()?)" if none else "forward")
                if self.last_report.skipped:
                    log.warning("Subspace step %d: the dense gradient held inf/NaN; this remove-and-add step was skipped",
                                self.t)
                if scaler is not None and scaler.is_enabled():
                    # No optimizer step, but the scaler's iteration must end as after scaler.step. The scale
                    # follows this step's own overflow, which every rank agrees on (skipped: back off as
                    # after a skipped step); the scaler's inf checks are each rank's own gradients here
                    # (DDP does not average a capture step's), and under them the ranks' scales would part.
                    scale = scaler.get_scale()
                    scaler.update(scale * scaler.get_backoff_factor() if self.last_report.skipped else scale)
            else:
                _STEPPING.add(self.optimizer)
                try:
                    if scaler is not None:
                        scaler.step(self.optimizer)
                        scaler.update()
                    else:
                        self.optimizer.step()
                finally:
                    _STEPPING.discard(self.optimizer)
            if self.t >= self.total_steps and not self._told_past:  # once: a run longer than the schedule was fitted to
                self._told_past = True
                log.warning("Subspace.step() call %d is past total_steps=%d: the remove-and-add steps were spaced for %d steps "
                            "and ended at step %d; pass the run's whole length (len(loader) * epochs)", self.t + 1,
                            self.total_steps, self.total_steps, self.schedule.t_end)
            self.t += 1
            return update

    def drop_fraction(self) -> float:
        return self.schedule.drop_fraction(self.t)

    def state_dict(self) -> dict[str, int]:
        """The schedule's position ``t``, with its spacing and end (``delta_t``, ``t_end`` in steps)."""
        return {"t": self.t, "delta_t": self.schedule.delta_t, "t_end": self.schedule.t_end}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if not isinstance(state, dict) or "t" not in state:
            keys = f" of keys {sorted(map(str, state))}" if isinstance(state, dict) and state else ""
            raise ValueError(f"a {type(state).__name__}{keys} is no Subspace state: pass what subspace.state_dict() returned")
        if whole("the state's t", state["t"]) < 0:
            raise ValueError(f"the state's t is a step count, got {state['t']}")
        saved = {k: state[k] for k in ("delta_t", "t_end") if k in state}
        mine = {"delta_t": self.schedule.delta_t, "t_end": self.schedule.t_end}
        if any(saved[k] != mine[k] for k in saved):
            log.warning("the Subspace state was saved under %s, this Subspace has %s (was total_steps or delta_t the "
                        "same?): the schedule goes on from step %d under this one's", saved, mine, state["t"])
        self.t = int(state["t"])

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise TypeError("a Subspace is not pickled or copied (its hooks belong to the model and optimizer it was built "
                        "with): save subspace.state_dict() and, in the new process, build Subspace(model, optimizer, "
                        "...) again and load_state_dict() it")

    def remove(self) -> None:
        """End the schedule: detach the hooks from the model and the optimizer; a dense gradient
        captured since the last :meth:`step` is dropped (mu keeps its own). ``step()`` then refuses."""
        self._close_capture(average=False)
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        self._removed = True


__all__ = ["OptimizerStateError", "Prediction", "Subspace", "kl_term", "param_groups", "predict"]
