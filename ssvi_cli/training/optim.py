"""The optimizer and the two schedules of a run (METHOD.md §2, §5): learning rate and KL weight.

Group 1 holds mu, biases and BatchNorm (``lr``, weight decay); group 2 holds rho (``lr_sigma``, no
weight decay). Both learning rates follow the same schedule factor.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from ssvi_cli.config import Config, OptimConfig
from ssvi_cli.registry import Registry

OPTIMIZERS: Registry[Callable[[list[dict], OptimConfig], torch.optim.Optimizer]] = Registry("optimizer")
OPTIMIZERS.add("sgd", lambda groups, o: torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum))
OPTIMIZERS.add("adam", lambda groups, o: torch.optim.Adam(groups, lr=o.lr))

# step / total_steps -> learning-rate factor
LR_SCHEDULES: Registry[Callable[[float], float]] = Registry("learning-rate schedule")
LR_SCHEDULES.add("cosine", lambda progress: 0.5 * (1.0 + math.cos(math.pi * progress)))
LR_SCHEDULES.add("constant", lambda progress: 1.0)


def param_groups(model: nn.Module, cfg: Config) -> list[dict]:
    """Group 1: mu, biases, BatchNorm (lr, weight decay); group 2: rho (lr_sigma, no decay)."""
    rho = [p for n, p in model.named_parameters() if n.endswith(".rho") or n == "rho"]
    rho_ids = {id(p) for p in rho}
    rest = [p for p in model.parameters() if id(p) not in rho_ids]
    o = cfg.optim
    groups = [{"params": rest, "lr": o.lr, "weight_decay": o.weight_decay, "base_lr": o.lr, "name": "mu"}]
    if rho:
        groups.append({"params": rho, "lr": o.lr_sigma, "weight_decay": 0.0, "base_lr": o.lr_sigma,
                       "name": "rho"})
    return groups


def make_optimizer(model: nn.Module, cfg: Config) -> torch.optim.Optimizer:
    return OPTIMIZERS.get(cfg.optim.name)(param_groups(model, cfg), cfg.optim)


def lr_factor(cfg: Config, step: int, total_steps: int) -> float:
    return LR_SCHEDULES.get(cfg.optim.schedule)(step / total_steps)


def kl_weight(cfg: Config, step: int, total_steps: int, n_train: int) -> float:
    """beta * warmup(step) / N: warm-up ``min(2 t / T, 1)`` (linear over the first half) when enabled."""
    b = cfg.bayes
    if not cfg.method.bayesian:
        return 0.0
    warm = min(2.0 * step / total_steps, 1.0) if b.kl_warmup else 1.0
    return b.beta * warm / n_train
