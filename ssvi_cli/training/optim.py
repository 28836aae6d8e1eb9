"""The optimizer, the KL term and the two schedules of a run (METHOD.md §2, §5): learning rate and KL weight.

Group 1 holds mu, biases and BatchNorm (``lr``, weight decay); group 2 holds rho (``lr_sigma``, no
weight decay). Both learning rates follow the same schedule factor.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from ssvi_cli.argcheck import real, whole
from ssvi_cli.config import Config, OptimConfig
from ssvi_cli.core.layers import sparse_layers
from ssvi_cli.registry import Registry

def kl_term(model: nn.Module, n_train: int, beta: float = 1.0, prior_sigma: float = 0.005) -> torch.Tensor:
    """``beta * sum_layers KL(q || N(0, prior_sigma^2)) / n_train``, the per-example KL of the
    (tempered, ``beta < 1``) ELBO over the active weights only (0 for a deterministic model).

    The defaults are the plain ELBO under the CIFAR recipe's prior; on a small dataset its pull to
    N(0, 0.005^2) swamps the data term (the recipes temper it: ``beta=0.01``; digits also
    ``prior_sigma=0.1``)."""
    layers = [layer for _, layer in sparse_layers(model)]
    if not layers:
        raise ValueError("the model has no sparse Gaussian layers; convert it with ssvi_cli.sparsify first")
    if not whole("n_train", n_train) >= 1:
        raise ValueError(f"n_train={n_train}: the number of training examples must be at least 1")
    if not real("beta", beta) >= 0 or not real("prior_sigma", prior_sigma) > 0:
        raise ValueError(f"beta={beta}, prior_sigma={prior_sigma}: beta must be >= 0 and prior_sigma > 0")
    return beta * total_kl(model, prior_sigma, layers[0].mu.device) / n_train


def total_kl(model: nn.Module, prior_sigma: float, device: torch.device) -> torch.Tensor:
    """``sum_layers KL(q || N(0, prior_sigma^2))`` over the active weights (0 for a deterministic model)."""
    return sum((layer.kl(prior_sigma) for _, layer in sparse_layers(model)), torch.zeros((), device=device))


OPTIMIZERS: Registry[Callable[[list[dict], OptimConfig], torch.optim.Optimizer]] = Registry("optimizer")
OPTIMIZERS.add("sgd", lambda groups, o: torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum))
OPTIMIZERS.add("adam", lambda groups, o: torch.optim.Adam(groups, lr=o.lr))

# step / total_steps -> learning-rate factor
LR_SCHEDULES: Registry[Callable[[float], float]] = Registry("learning-rate schedule")
LR_SCHEDULES.add("cosine", lambda progress: 0.5 * (1.0 + math.cos(math.pi * progress)))
LR_SCHEDULES.add("constant", lambda progress: 1.0)


def param_groups(model: nn.Module, lr: float, lr_sigma: float, weight_decay: float = 0.0) -> list[dict]:
    """Two parameter groups (METHOD.md §5): mu, biases and everything else with ``lr`` and
    ``weight_decay``; rho with ``lr_sigma`` and no weight decay. Each group records its ``base_lr``,
    the value a learning-rate schedule scales."""
    for arg, value in (("lr", lr), ("lr_sigma", lr_sigma), ("weight_decay", weight_decay)):
        if real(arg, value) < 0:
            raise ValueError(f"{arg}={value} must be at least 0")
    layers = sparse_layers(model)
    if not layers:  # groups for the dense weights sparsify is about to replace
        raise ValueError("the model has no sparse Gaussian layers; convert it with ssvi_cli.sparsify first")
    rho = [layer.rho for _, layer in layers if layer.rho is not None]
    rho_ids = {id(p) for p in rho}
    rest = [p for p in model.parameters() if id(p) not in rho_ids]
    groups = [{"params": rest, "lr": lr, "weight_decay": weight_decay, "base_lr": lr, "name": "mu"}]
    if rho:
        groups.append({"params": rho, "lr": lr_sigma, "weight_decay": 0.0, "base_lr": lr_sigma, "name": "rho"})
    return groups


def make_optimizer(model: nn.Module, cfg: Config) -> torch.optim.Optimizer:
    o = cfg.optim
    return OPTIMIZERS.get(o.name)(param_groups(model, o.lr, o.lr_sigma, o.weight_decay), o)


def lr_factor(cfg: Config, step: int, total_steps: int) -> float:
    return LR_SCHEDULES.get(cfg.optim.schedule)(step / total_steps)


def kl_weight(cfg: Config, step: int, total_steps: int, n_train: int) -> float:
    """beta * warmup(step) / N: warm-up ``min(2 t / T, 1)`` (linear over the first half) when enabled."""
    b = cfg.bayes
    if not cfg.method.bayesian:
        return 0.0
    warm = min(2.0 * step / total_steps, 1.0) if b.kl_warmup else 1.0
    return b.beta * warm / n_train
