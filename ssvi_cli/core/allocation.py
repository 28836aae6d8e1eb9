"""Per-layer active counts (uniform or ERK) and the initial support and values of every layer."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Collection

import torch
from torch import nn

from ssvi_cli.registry import Registry, UnknownName

from ssvi_cli.core.layers import SparseGaussian, sparse_layers
from ssvi_cli.config import MU_INITS, BayesConfig
from ssvi_cli.core.gaussian import rho_from_sigma


@dataclass(frozen=True)
class InitSpec:
    """How mu and sigma start (METHOD.md section 5)."""

    mu_std: float = BayesConfig.mu_init_std  # "fixed": every layer; otherwise only the layers followed by BatchNorm
    # The others: "fan_in", a He init over the active fan-in, N(0, 2 / (fan_in * density)); "dense_fan_in",
    # over the whole fan-in, N(0, 2 / fan_in), as a dense layer's init with its inactive entries masked.
    mu_init: str = BayesConfig.mu_init
    sigma_mean: float = BayesConfig.sigma_init_mean  # the config's defaults, read from it
    sigma_std: float = BayesConfig.sigma_init_std
    sigma_param: str = BayesConfig.sigma_param

    def __post_init__(self) -> None:
        if self.mu_init not in MU_INITS:
            raise ValueError(f"mu_init={self.mu_init!r}; valid values are: {', '.join(MU_INITS)}")


class AllocationError(ValueError):
    """A sparsity that leaves a layer without active weights, or an unknown allocation."""


def active_count(numel: int, density: float) -> int:
    """|gamma| = round(density * n)."""
    return int(round(density * numel))


def layer_densities(layers: list[tuple[str, SparseGaussian]], density: float, allocation: str,
                    dense_stem: bool, whole: Collection[str] = ()) -> dict[str, float]:
    """Density per layer: stem dense when asked and the layers named in ``whole`` dense, both outside
    the budget; the rest uniform or ERK (RigL's allocation)."""
    out: dict[str, float] = {}
    sparse = []
    for name, layer in layers:
        if density >= 1.0 or (dense_stem and layer.stem) or name in whole:
            out[name] = 1.0
        else:
            sparse.append((name, layer))
    out.update(ALLOCATIONS.get(allocation)(sparse, density))
    for name, layer in layers:
        if active_count(layer.numel, out[name]) < 1:
            raise AllocationError(
                f"sparsity {1 - density:.15g} leaves layer {name} ({layer.numel} weights) with no "
                f"active weight; use a lower sparsity (at most {round(1 - 1 / layer.numel, 12)}: one weight)"
            )
    return out


def _erk(layers: list[tuple[str, SparseGaussian]], density: float) -> dict[str, float]:
    """Erdos-Renyi-Kernel: density_l proportional to sum(shape)/prod(shape), capped at 1, with the
    budget of capped layers redistributed so the total active count matches ``density``."""
    dense: set[str] = set()
    total = sum(l.numel for _, l in layers)
    while True:
        budget = density * total - sum(l.numel for n, l in layers if n in dense)
        raw = {n: sum(l.weight_shape) / math.prod(l.weight_shape) for n, l in layers if n not in dense}
        denom = sum(raw[n] * l.numel for n, l in layers if n not in dense)
        eps = budget / denom if denom > 0 else 0.0
        over = [n for n in raw if eps * raw[n] > 1.0]
        if not over:
            break
        dense.update(over)
    return {n: 1.0 if n in dense else eps * raw[n] for n, _ in layers}


def _uniform(layers: list[tuple[str, SparseGaussian]], density: float) -> dict[str, float]:
    return {name: density for name, _ in layers}


class UnknownAllocation(UnknownName, AllocationError):
    """An allocation name that is not registered."""


# (sparse layers, overall density) -> density per layer
ALLOCATIONS: Registry[Callable[[list[tuple[str, SparseGaussian]], float], dict[str, float]]] = \
    Registry("allocation", error=UnknownAllocation)
ALLOCATIONS.add("uniform", _uniform)
ALLOCATIONS.add("erk", _erk)


def initialise(model: nn.Module, densities: dict[str, float], init: InitSpec,
               generator: torch.Generator) -> None:
    """Draw a random support of the planned size and initial mu/rho for every sparse layer."""
    for name, layer in sparse_layers(model):
        k = active_count(layer.numel, densities[name])
        if k == layer.numel:
            idx = torch.arange(k)
        else:
            idx = torch.randperm(layer.numel, generator=generator)[:k].sort().values
        if layer.normed or init.mu_init == "fixed":
            std = init.mu_std
        elif init.mu_init == "dense_fan_in":
            # A sparse layer's outputs start smaller than a dense one's, by about sqrt(density).
            std = math.sqrt(2.0 / layer.fan_in)
        else:
            # He init over the *active* fan-in keeps activations O(1) without BN.
            std = math.sqrt(2.0 / max(1.0, layer.fan_in * densities[name]))
        mu = torch.randn(k, generator=generator) * std
        rho = None
        if layer.bayesian:
            sigma = (init.sigma_mean + init.sigma_std * torch.randn(k, generator=generator)).abs()
            rho = rho_from_sigma(sigma.clamp_min(1e-8), init.sigma_param)
        layer.set_support(idx, mu, rho)
        if layer.bias is not None:
            nn.init.zeros_(layer.bias)


def kept_dense_weights(model: nn.Module) -> int:
    """Weights of the model's matrices and kernels outside its sparse layers: the parameters of two or
    more dimensions of the layers ``sparsify`` keeps as they are (attention projections, a padded
    conv), of embeddings and of a module's own (a layer scale), which no sparsity, file saving or
    FLOPs count covers."""
    return sum(kept_dense_by_kind(model).values())


def kept_dense_by_kind(model: nn.Module) -> dict[str, int]:
    """:func:`kept_dense_weights` by the class of the module that holds them, most first."""
    sparse = {id(layer) for _, layer in sparse_layers(model)}
    seen: set[int] = set()
    kinds: dict[str, int] = {}
    for module in model.modules():
        if id(module) in sparse:
            continue
        for p in module.parameters(recurse=False):
            if p.dim() >= 2 and id(p) not in seen:
                seen.add(id(p))
                kinds[type(module).__name__] = kinds.get(type(module).__name__, 0) + p.numel()
    return dict(sorted(kinds.items(), key=lambda kv: -kv[1]))


def kept_dense_note(model: nn.Module) -> str:
    """``6,624 weights sit outside the layers ssvi makes sparse (6,624 in CNBlock)``, or ""."""
    kinds = kept_dense_by_kind(model)
    if not kinds:
        return ""
    where = ", ".join(f"{n:,} in {kind}" for kind, n in list(kinds.items())[:3]) + (", ..." if len(kinds) > 3 else "")
    return (f"{sum(kinds.values()):,} weights sit outside the layers ssvi makes sparse ({where}: embeddings, "
            "projections an attention reads itself, a module's own parameters; docs/API.md, sparsify)")


def stem_note(model: nn.Module, sparsity: float) -> str:
    """A note where the stem that ``dense_first_conv`` keeps whole moves the model's density off
    ``1 - sparsity`` by more than 0.001, or ""."""
    named = sparse_layers(model)
    stems = [(name, layer) for name, layer in named if layer.stem and layer.active == layer.numel]
    total = sum(layer.numel for _, layer in named)
    density = sum(layer.active for _, layer in named) / total if total else 1.0
    if not stems or sparsity <= 0 or density - (1 - sparsity) <= 1e-3:
        return ""
    names = ", ".join(f"{name} ({layer.numel:,} weights)" for name, layer in stems)
    return (f"the first conv, {names}, stays dense (model.dense_stem), so the model's density is {density:.4f}, "
            f"not {1 - sparsity:.4f} (--set model.dense_stem=false makes it sparse too)")
