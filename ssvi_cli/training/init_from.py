"""``model.init_from``: start a torchvision model's posterior from trained deterministic weights.

The file is a ``state_dict`` of the deterministic model, as ``.pt`` (read with
``torch.load(..., weights_only=True)``) or ``.safetensors``. Its keys and shapes must match the
architecture the run builds (``num_classes`` and the first conv's channels adapted to the data);
the first mismatching key is named. The support of each layer is then its largest-|w| entries at
the planned density, ``mu = w`` there, sigma from the configured init (``core.convert.sparsify``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from ssvi_cli.config import Config, ConfigError
from ssvi_cli.data.spec import DataSpec
from ssvi_cli.models import TORCHVISION, torchvision_base


def read_state_dict(path: Path) -> dict[str, Tensor]:
    """A state_dict from ``.pt`` (weights only) or ``.safetensors``; a clear error for anything else."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"--init-from {path}: no such file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any reader failure is one message naming the file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"--init-from {path} is not a readable state_dict ({first[:160]})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ConfigError(f"--init-from {path} does not hold a state_dict (a mapping of names to tensors)")
    return state


def check_state_dict(model: nn.Module, state: dict[str, Tensor], path: Path) -> None:
    """Keys and shapes of ``state`` against ``model``'s; the first difference is named."""
    expected = model.state_dict()
    for key, value in expected.items():
        if key not in state:
            raise ConfigError(f"--init-from {path} lacks {key!r} (shape {tuple(value.shape)}) of the model")
        if tuple(state[key].shape) != tuple(value.shape):
            raise ConfigError(f"--init-from {path}: {key!r} has shape {tuple(state[key].shape)}, the model "
                              f"needs {tuple(value.shape)} (check the number of classes and input channels)")
    extra = [k for k in state if k not in expected]
    if extra:
        raise ConfigError(f"--init-from {path} holds {extra[0]!r}, which the model does not have")


def model_from_weights(cfg: Config, spec: DataSpec, state: dict[str, Tensor], generator: torch.Generator) -> nn.Module:
    """The run's model with its supports and means taken from the trained weights ``state``."""
    from ssvi_cli.core.convert import sparsify

    model = base_for(cfg, spec)
    model.load_state_dict(state)
    b = cfg.bayes
    sparsify(model, 1.0 - cfg.density, bayesian=cfg.method.bayesian, dense_first_conv=cfg.model.dense_stem,
             allocation=cfg.sparse.allocation, sigma_mean=b.sigma_init_mean, sigma_std=b.sigma_init_std,
             sigma_param=b.sigma_param, kernel=cfg.train.kernel, generator=generator)
    return model


def base_for(cfg: Config, spec: DataSpec) -> nn.Module:
    """The deterministic torchvision model the state_dict must fit."""
    if not cfg.model.name.startswith(TORCHVISION):
        raise ConfigError(f"model.init_from needs a torchvision:NAME model, not {cfg.model.name!r}")
    return torchvision_base(cfg.model.name[len(TORCHVISION):], spec.input_shape, spec.num_classes)
