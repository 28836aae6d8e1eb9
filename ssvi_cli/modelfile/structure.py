"""Whether a module is a given architecture: the same modules with the same settings (kernel,
stride, pooling, ...), the same sparse layers and the same other tensors, in the same order; the first
difference is named."""

from __future__ import annotations

from typing import Any

from torch import nn

from ssvi_cli.core.layers import SparseGaussian, sparse_layers
from ssvi_cli.modelfile.writer import dense_state


def _structure(model: nn.Module) -> list[tuple[str, Any, Any]]:
    """Every module (name, class, its own settings: kernel, stride, pooling, ...), the sparse layers
    (name, weight shape, Bayesian), then every other state tensor (name, shape)."""
    out: list[tuple[str, Any, Any]] = [(n, type(m).__name__, _settings(m)) for n, m in model.named_modules()]
    out += [(n, layer.weight_shape, layer.bayesian) for n, layer in sparse_layers(model)]
    out += [(k, tuple(v.shape), False) for k, v in dense_state(model).items()]
    return out


def check_same_structure(expected: nn.Module, model: nn.Module, architecture: str) -> None:
    want, have = _structure(expected), _structure(model)
    for w, h in zip(want, have):
        if w != h:
            dense = h[1] in ("Linear", "Conv2d", "Conv1d") and w[1] in ("SparseLinear", "SparseConv2d", "SparseConv1d")
            raise ValueError(f"the model is not {architecture}: it has {h[0]!r} ({_what(h)}) where the "
                             f"builder has {w[0]!r} ({_what(w)})" + (
                                 "; a layer replaced after ssvi_cli.sparsify stays dense: sparsify the model again "
                                 "(it converts the new layer and leaves the sparse ones as they are)" if dense else ""))
    if len(want) != len(have):
        longer, which = (want, "builder") if len(want) > len(have) else (have, "model")
        raise ValueError(f"the model is not {architecture}: the {which} also has {longer[min(len(want), len(have))][0]!r}")


def _settings(module: nn.Module) -> str:
    """What a module computes beyond its tensors (a sparse layer's repr also counts its support)."""
    if isinstance(module, SparseGaussian):
        return ", ".join(f"{a}={getattr(module, a)}" for a in ("stride", "padding", "dilation", "groups")
                         if hasattr(module, a))
    return module.extra_repr()


def _what(entry: tuple[str, Any, Any]) -> str:
    kind = entry[1]
    return f"shape {list(kind)}" if isinstance(kind, tuple) else f"{kind}({entry[2]})"
