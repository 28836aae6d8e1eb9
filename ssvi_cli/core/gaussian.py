"""Gaussian maths of the posterior (METHOD.md §1-3): σ from ρ and back, the closed-form KL, noise.

``sigma = softplus(rho)`` by default (``exp`` as an option); every sparse layer stores ``rho`` and
computes ``sigma`` through :func:`sigma_from_rho`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ssvi_cli.registry import Registry

# why a Bayesian layer cannot be float16 (said by sparsify, and by a layer a model.half() made so)
HALF_SIGMA = ("cannot hold sigma (values below 6e-8 become 0); keep the model in float32 and train under "
              "torch.autocast, or use bfloat16")
LRT_EPS = 1e-8
"""Added to the LRT output variance before the square root (METHOD.md §3)."""


def input_under_autocast(x: Tensor, dtype: torch.dtype) -> bool:
    """Whether autocast is on for ``x``'s device; outside it an input of another floating dtype than
    the layer's ``dtype`` is refused, as ``nn.Linear`` refuses it, and an integer one anywhere."""
    autocast = torch.is_autocast_enabled(x.device.type)
    if not x.is_floating_point() or x.dtype != dtype and not autocast:  # the sparse kernels would cast
        raise RuntimeError(f"input of {x.dtype} for a layer in {dtype}; cast one to the other (x.to({dtype}))")
    return autocast


def _softplus_inverse(sigma: Tensor) -> Tensor:
    # log(expm1(s)) = s + log(1 - exp(-s)) is stable for large s; expm1 is exact for small s.
    return torch.where(sigma > 20, sigma + torch.log1p(-torch.exp(-sigma)), torch.log(torch.expm1(sigma)))


@dataclass(frozen=True)
class SigmaParam:
    """How the unconstrained ``rho`` maps to ``sigma > 0`` and back."""

    name: str
    forward: Callable[[Tensor], Tensor]
    inverse: Callable[[Tensor], Tensor]


SIGMA_PARAMS: Registry[SigmaParam] = Registry("sigma parameterisation")
SIGMA_PARAMS.add("softplus", SigmaParam("softplus", F.softplus, _softplus_inverse))
SIGMA_PARAMS.add("exp", SigmaParam("exp", torch.exp, torch.log))


def sigma_from_rho(rho: Tensor, param: str) -> Tensor:
    """sigma = softplus(rho) (default) or exp(rho)."""
    return SIGMA_PARAMS.get(param).forward(rho)


def rho_from_sigma(sigma: Tensor, param: str) -> Tensor:
    """Inverse of :func:`sigma_from_rho`: rho = log(expm1(sigma)) or log(sigma)."""
    return SIGMA_PARAMS.get(param).inverse(sigma.clamp_min(1e-30))


def gaussian_kl(mu: Tensor, sigma: Tensor, prior_sigma: float) -> Tensor:
    """sum_i KL(N(mu_i, sigma_i^2) || N(0, prior_sigma^2))
    = sum_i log(prior_sigma / sigma_i) + (sigma_i^2 + mu_i^2) / (2 prior_sigma^2) - 1/2."""
    var_p = prior_sigma**2
    return (math.log(prior_sigma) - torch.log(sigma) + (sigma**2 + mu**2) / (2 * var_p) - 0.5).sum()


def randn_like(t: Tensor) -> Tensor:
    """Standard normal noise of ``t``'s shape, always drawn contiguous (the vectorised path).

    ``torch.randn_like`` keeps a transposed layout (what the CSR kernel returns) and then fills it
    through a scalar loop, about ten times slower. A contiguous draw is also the same noise, element
    for element, whichever kernel produced ``t``, so the sparse and dense kernels follow one random
    stream.
    """
    if t.is_contiguous():
        return torch.randn_like(t)
    return torch.randn(t.shape, dtype=t.dtype, device=t.device)
