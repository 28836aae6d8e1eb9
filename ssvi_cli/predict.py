"""Prediction shared by training, evaluation and ``infer``: mean network or Monte Carlo average.

Monte Carlo prediction computes the first layer's LRT mean and variance once (exact: its input is
fixed) and draws each sample's first-layer output from them; deeper layers draw one weight sample
per Monte Carlo draw over their active entries only.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import Tensor

from ssvi_cli.layers import LRT_EPS, set_mode, set_buffer_reuse, sparse_layers
from ssvi_cli.models import SSVIModel

MODES = ("mc", "mean")


def is_bayesian(model: SSVIModel) -> bool:
    return model.first.bayesian


@torch.no_grad()
def predict_batch(model: SSVIModel, x: Tensor, samples: int = 10, mode: str = "mc"
                  ) -> tuple[Tensor, Optional[Tensor]]:
    """Return (probs (B, C), sample_probs (S, B, C) or None for the mean network)."""
    model.eval()
    if mode == "mean" or not is_bayesian(model):
        set_mode(model, "mean")
        return class_softmax(model(x).float()), None
    h = model.prepare(x)
    mean, var = model.first.moments(h)
    std = torch.sqrt(var + LRT_EPS)  # once: every draw of the first layer is mean + std * eps
    # One buffer holds each draw's noise and, overwritten in place, that draw's first-layer output:
    # no fresh 1 MB tensors per draw. It is laid out like ``mean`` (transposed after the CSR kernel):
    # a same-layout addcmul is faster than a mixed one and feeds the next CSR product without a
    # transpose copy. The noise is drawn contiguous, as ``randn`` of the buffer's shape would.
    transposed = mean.dim() == 2 and not mean.is_contiguous() and mean.t().is_contiguous()
    dtype = torch.promote_types(mean.dtype, std.dtype)  # std is float32 even under autocast
    buffer = torch.empty(mean.t().shape if transposed else mean.shape, dtype=dtype, device=mean.device)
    first_out = buffer.t() if transposed else buffer
    layers = [layer for _, layer in sparse_layers(model) if layer.bayesian]
    set_mode(model, "sample")
    for layer in layers:
        layer.sample_sigma = layer.sigma()
    set_buffer_reuse(model, True)  # each draw's outputs are consumed (softmax copies) before the next
    draws = []
    try:
        for _ in range(samples):
            buffer.normal_()
            torch.addcmul(mean, std, first_out, out=first_out)
            # softmax allocates, so nothing returned aliases the buffer overwritten by the next draw
            draws.append(class_softmax(model.forward_rest(first_out).float()))
    finally:
        for layer in layers:
            layer.sample_sigma = None
        set_buffer_reuse(model, False)
        set_mode(model, "lrt")
    stacked = torch.stack(draws)
    return stacked.mean(0), stacked


def class_softmax(logits: Tensor) -> Tensor:
    """Softmax over the last (class) dimension of ``logits``.

    For (batch, classes) logits on the CPU it runs on the contiguous (classes, batch) transpose: the
    CPU kernel is about ten times slower along a short last dimension (10 classes) than along a
    leading one, where it vectorises over the batch. Same values, returned as a (batch, classes) view.
    """
    if logits.dim() == 2 and logits.device.type == "cpu":
        return torch.softmax(logits.t().contiguous(), dim=0).t()
    return torch.softmax(logits, dim=-1)


@torch.no_grad()
def predict_loader(model: SSVIModel, batches: Iterable, device: torch.device, samples: int = 10,
                   mode: str = "mc", keep_samples: bool = True, on_batch=None
                   ) -> dict[str, Optional[Tensor]]:
    """Predict over (x, y) batches; returns probs, labels and (optionally) per-sample probs on CPU."""
    probs, labels, sample_probs = [], [], []
    for x, y in batches:
        p, sp = predict_batch(model, x.to(device), samples, mode)
        probs.append(p.cpu())
        labels.append(torch.as_tensor(y).cpu())
        if sp is not None and keep_samples:
            sample_probs.append(sp.cpu())
        if on_batch is not None:
            on_batch(len(y))
    return {
        "probs": torch.cat(probs) if probs else torch.zeros(0),
        "labels": torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long),
        "sample_probs": torch.cat(sample_probs, dim=1) if sample_probs else None,
    }
