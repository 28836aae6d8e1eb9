"""``model.init_from``: start a torchvision model's posterior from trained deterministic weights
(read and checked by ``training.init_weights``).

The support of each loaded layer is its largest-|w| entries at the planned density, ``mu = w``
there, sigma from the configured init (``core.convert.sparsify``). A layer whose weight the state
leaves out (the head of published weights trained for other classes) starts as in a fresh run.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ssvi_cli.config import Config, ConfigError
from ssvi_cli.core.allocation import initialise, layer_densities
from ssvi_cli.core.layers import sparse_layers
from ssvi_cli.core.state import load_tensors
from ssvi_cli.data.spec import DataSpec
from ssvi_cli.training.init_weights import base_for
from ssvi_cli.training.plan import init_spec


def model_from_weights(cfg: Config, spec: DataSpec, state: dict[str, Tensor], generator: torch.Generator) -> nn.Module:
    """The run's model with its supports and means taken from the trained weights ``state``; a
    layer whose weight ``state`` leaves out (a re-initialised head) starts as in a fresh run: a
    random support at the planned density, mu from the configured init, zero bias."""
    from ssvi_cli.core.convert import sparsify

    model = base_for(cfg, spec)
    loaded = load_tensors(model, state)
    if loaded.unexpected_keys:
        raise ConfigError(f"model.init_from holds {loaded.unexpected_keys[0]!r}, which the model does not have")
    fresh = {k.rpartition(".")[0] for k in loaded.missing_keys}
    b = cfg.bayes
    sparsify(model, 1.0 - cfg.density, bayesian=cfg.method.bayesian, dense_first_conv=cfg.model.dense_stem,
             allocation=cfg.sparse.allocation, sigma_mean=b.sigma_init_mean, sigma_std=b.sigma_init_std,
             sigma_param=b.sigma_param, kernel=cfg.train.kernel, generator=generator,
             _say_kept=False)  # ssvi train's note counts them (core.allocation.kept_dense_note)
    layers = sparse_layers(model)
    heads = [(n, layer) for n, layer in layers if n in fresh]
    if heads:
        densities = layer_densities(layers, cfg.density, cfg.sparse.allocation, cfg.model.dense_stem)
        holder = nn.ModuleList([layer for _, layer in heads])  # initialise() takes a module and names
        initialise(holder, {str(i): densities[n] for i, (n, _) in enumerate(heads)}, init_spec(cfg), generator)
    return model
