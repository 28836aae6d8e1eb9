"""ssvi: sparse Bayesian neural networks with Sparse Subspace Variational Inference.

The public Python API is importable from here (``import ssvi_cli as ssvi``); names load on first
use, so ``ssvi presets`` or ``import ssvi_cli.config`` do not pay for torch:

- :func:`sparsify`: any ``nn.Module``'s Linear/Conv2d/Conv1d layers as sparse Gaussian layers (``core.convert``)
- :func:`param_groups`, :func:`kl_term`, :class:`Subspace` (``ssvi_cli.api``)
- :func:`predict`: Monte Carlo prediction with uncertainty (``ssvi_cli.prediction``)
- :func:`preprocess`: pixels as the model's file says its inputs are made (``evaluation.arrays``)
- :func:`save`, :func:`load`: the compact model file of any converted module (``modelfile.module_io``,
  ``modelfile.loading``)
"""

from __future__ import annotations

import importlib
from typing import Any

from ssvi_cli.version import __version__

_PUBLIC = {
    "sparsify": "ssvi_cli.core.convert", "ConversionReport": "ssvi_cli.core.convert",
    "param_groups": "ssvi_cli.api", "kl_term": "ssvi_cli.api", "Subspace": "ssvi_cli.api",
    "predict": "ssvi_cli.prediction", "Prediction": "ssvi_cli.prediction", "OptimizerStateError": "ssvi_cli.api",
    "save": "ssvi_cli.modelfile.module_io", "load": "ssvi_cli.modelfile.loading",
    "ModelFileError": "ssvi_cli.modelfile.header", "sampling": "ssvi_cli.sample_modes",
    "preprocess": "ssvi_cli.evaluation.arrays",
}

__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'ssvi_cli' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
