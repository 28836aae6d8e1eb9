"""Prediction shared by training, evaluation and ``infer``: mean network or Monte Carlo average.

Monte Carlo prediction draws one weight sample per draw over the active entries only in every layer after
the first. For a *linear* first layer two exact schemes exist: compute its LRT mean and variance once and
draw each sample's output from them (one normal per output element per draw), or sample its weights like
the other layers (one normal per active weight plus a product per draw). Each output row of a linear layer
depends on one input row, so per input both give exactly the distribution of a weight draw;
:func:`first_layer_scheme` picks the cheaper by a cost rule that depends on the layer, the batch and the
device only (never on the thread count, so the same model, seed and batch size give the same numbers on
any CPU). A *conv* first layer always samples its weights: one weight draw is shared by every pixel of an
image, and LRT noise drawn independently per output position would lose that correlation (METHOD.md §3).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import numpy as np
import torch
from torch import Tensor, nn

from ssvi_cli.argcheck import whole
from ssvi_cli.core.convert import unfilled
from ssvi_cli.core.flops import separate_first_layer
from ssvi_cli.core.gaussian import input_under_autocast
from ssvi_cli.core.layers import SparseGaussian, SparseLinear, sparse_layers
from ssvi_cli.core.modes import drawing, evaluating, one_draw_per_forward, sampling
from ssvi_cli.metrics import has_spread, mutual_information, predictive_entropy
from ssvi_cli.models import SSVIModel

MODES = ("mc", "mean")
FIRST_LAYER_SCHEMES = ("auto", "moments", "sample")

# How many multiply-adds of the first layer's product cost as much as drawing one standard normal,
# per thread: torch's CPU ``normal_`` runs on one thread while the products use them all. Measured
# with the 784-1024 layer of ``ssvi bench --model mlp`` at 1 and 2 threads (x86, AVX-512): a normal ~2.3 ns,
# a CSR multiply-add ~0.04 ns per thread, a dense (BLAS) one ~0.014 ns per thread. With ``embedding_bag``
# serving the sparse product where it is faster the rule errs towards the moments; timing both schemes at
# densities 0.02-0.2 and batches 1-256 it picked the faster one (or one within 5 %) every time.
MACS_PER_NORMAL = {"sparse": 60.0, "dense": 170.0}
# The rule prices products as if RULE_THREADS threads ran them, whatever torch.get_num_threads()
# says: the scheme (and with it the random stream) must not change with the thread count.
RULE_THREADS = 2


def is_bayesian(model: SSVIModel) -> bool:
    """Whether any weight layer has a posterior (sigma)."""
    return any(layer.bayesian for _, layer in sparse_layers(model))


def first_layer_scheme(layer: SparseGaussian, h: Tensor) -> str:
    """``moments`` or ``sample``: the cheaper exact Monte Carlo scheme for the first layer on ``h``.

    A conv layer always samples (the moments are exact only for a linear layer). Per draw,
    ``moments`` draws one normal per output element; ``sample`` draws one per active weight and runs
    the layer's product (its multiply-adds converted to normals by :data:`MACS_PER_NORMAL` at
    :data:`RULE_THREADS` threads). The constants are CPU measurements; elsewhere the moments are
    reused.
    """
    if not layer.is_linear():
        return "sample"
    if h.device.type != "cpu":
        return "moments"
    positions = layer.positions(h)
    sparse = layer.uses_sparse_kernel()
    macs = positions * (layer.active if sparse else layer.numel)
    sample = layer.active + macs / (MACS_PER_NORMAL["sparse" if sparse else "dense"] * RULE_THREADS)
    moments = positions * layer.weight_shape[0]
    return "sample" if sample < moments else "moments"


@torch.no_grad()
def predict_batch(model: SSVIModel, x: Tensor, samples: int = 10, mode: str = "mc",
                  first_layer: str = "auto") -> tuple[Tensor, Optional[Tensor]]:
    """Return (probs (B, C), sample_probs (S, B, C) or None for the mean network). ``first_layer``: the
    first layer's Monte Carlo scheme (the module docstring), ``auto`` by :func:`first_layer_scheme`."""
    if first_layer not in FIRST_LAYER_SCHEMES:
        raise ValueError(f"first_layer must be one of {', '.join(FIRST_LAYER_SCHEMES)}, got {first_layer!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}" + ("; one network drawn at a time is "
                         "with ssvi.sampling(model, 'sample'): model(x)" if mode == "sample" else ""))
    if mode == "mc" and samples < 1:
        raise ValueError(f"samples must be a positive number of draws, got {samples!r}")
    with evaluating(model):
        probs, draws = _predict(model, x, samples, mode, first_layer)
    bad = ~torch.isfinite(probs).all(dim=-1)
    if bool(bad.any()):  # NaN probabilities would read as a confident class with zero entropy
        raise NonFiniteOutput(int(bad.sum()), int(bad.nonzero()[0, 0]))
    return probs, draws


class NonFiniteOutput(ValueError):
    """The model's probabilities are not finite for ``count`` inputs of a batch, the first at index
    ``first`` (a caller that knows more names that input: :meth:`naming`)."""

    def __init__(self, count: int, first: int, where: str = "") -> None:
        self.count, self.first = count, first
        super().__init__(f"the model's outputs are not finite (NaN or infinite logits), first for "
                         f"{where or f'the input at index {first}'} ({count} of its batch): its weights or these "
                         "inputs overflow float32 (a damaged or diverged model)")

    def naming(self, offset: int = 0, name: str = "") -> "NonFiniteOutput":
        """The same refusal with the first input at ``offset`` + its index in the batch, or named
        ``name`` (a file, say)."""
        return NonFiniteOutput(self.count, offset + self.first, name)


def _predict(model: SSVIModel, x: Tensor, samples: int, mode: str, first_layer: str
             ) -> tuple[Tensor, Optional[Tensor]]:
    if mode == "mean" or not is_bayesian(model):
        with sampling(model, "mean"):
            return class_softmax(_logits(model, x)), None
    if separate_first_layer(model) is None:
        # Any other module (a converted torchvision or user network): every layer samples its weights,
        # without the reused draw buffers, which assume each layer runs once per forward.
        if first_layer == "moments":
            raise ValueError("first_layer='moments' needs a model with a separate first layer (first, forward_rest)")
        with sampling(model, "sample"), one_draw_per_forward(model) as next_forward:
            def each() -> Tensor:
                next_forward()  # a layer the forward calls twice (shared weights) uses one draw
                return class_softmax(_logits(model, x))

            stacked = _stacked(samples, each)
        return stacked.mean(0), stacked
    h = model.prepare(x)
    if first_layer == "auto":
        first_layer = first_layer_scheme(model.first, h)
    elif first_layer == "moments" and not model.first.is_linear():
        raise ValueError("first_layer='moments' is exact only for a linear first layer; this model's "
                         "first layer is a convolution, whose weight draw is shared across pixels: use 'sample'")
    if first_layer == "sample":
        if h.dim() == 2 and isinstance(model.first, SparseLinear) and model.first.uses_sparse_kernel():
            h = h.t().contiguous().t()  # the sparse kernels read the input transposed: copy once, not per draw

        def draw() -> Tensor:
            return model.forward_rest(model.first(h))

        drawn = [layer for _, layer in sparse_layers(model)]
    else:
        autocast = input_under_autocast(h, model.first.mu.dtype)  # the first layer's forward is not called
        mean, var = model.first.moments(h)
        # Each draw is mean + std * eps, as sampling the weights gives: no LRT_EPS (training's, for sqrt's
        # gradient at 0), which was all the spread of a tiny-sigma layer and moved MI with the scheme.
        std = var.clamp_min(0).sqrt()
        # One buffer holds each draw's noise and, overwritten in place, that draw's first-layer output:
        # no fresh 1 MB tensors per draw. It is laid out like ``mean`` (transposed after the CSR
        # kernel): a same-layout addcmul is faster than a mixed one and feeds the next CSR product
        # without a transpose copy. The noise is drawn contiguous, as ``randn`` of its shape would be.
        transposed = mean.dim() == 2 and not mean.is_contiguous() and mean.t().is_contiguous()
        dtype = torch.promote_types(mean.dtype, std.dtype)  # std is float32 even under autocast
        buffer = torch.empty(mean.t().shape if transposed else mean.shape, dtype=dtype, device=mean.device)
        first_out = buffer.t() if transposed else buffer

        # the first layer's output as its forward gives it: outside autocast in the input's dtype (a
        # bfloat16 model's next layer refuses the float32 of the promoted buffer)
        to_input = dtype != h.dtype and h.is_floating_point() and not autocast

        def draw() -> Tensor:
            buffer.normal_()
            out = torch.addcmul(mean, std, first_out, out=first_out)
            return model.forward_rest(out.to(h.dtype) if to_input else out)

        drawn = [layer for _, layer in sparse_layers(model) if layer is not model.first]
    with sampling(model, "sample"), drawing(drawn):
        stacked = _stacked(samples, lambda: class_softmax(_at_least_float32(_class_logits(draw()))))
    return stacked.mean(0), stacked


def _stacked(samples: int, draw: Callable[[], Tensor]) -> Tensor:
    """``samples`` calls of ``draw`` stacked (S, B, C), each written into its place as it comes: a list
    of fresh tensors stacked at the end held the draws twice, and each small one kept between two draws'
    large fresh activations fragmented the heap (0.7 MB of the process's memory per draw of the digits
    MLP, never given back: 7.5 GB at S = 10,000)."""
    first = draw()
    out = first.new_empty((samples, *first.shape))
    out[0] = first
    for i in range(1, samples):
        out[i] = draw()
    return out


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's parameters (the CPU for a model that has none)."""
    params = list(model.parameters())
    return params[0].device if params else torch.device("cpu")


def _logits(model: nn.Module, x: Tensor) -> Tensor:
    out = model(x)
    if not isinstance(out, Tensor):
        raise TypeError(f"the model's forward returned a {type(out).__name__}; prediction needs one tensor of class "
                        "logits (wrap the model so that it returns them: a transformers model's .logits, docs/API.md)")
    return _at_least_float32(_class_logits(out))


def _class_logits(logits: Tensor) -> Tensor:
    """``logits`` if they are (batch, classes); anything else is one ValueError saying what to do."""
    if logits.dim() != 2:
        hint = ("one example gives (classes,): pass a batch, x.unsqueeze(0)" if logits.dim() == 1 else
                "flatten the other dimensions into the batch, e.g. logits.flatten(0, -2)")
        raise ValueError(f"prediction needs (batch, classes) logits; the model returned shape {tuple(logits.shape)} ({hint})")
    return logits


def _at_least_float32(logits: Tensor) -> Tensor:
    """Logits in float32 (half types are raised; a float64 model keeps float64)."""
    return logits if logits.dtype == torch.float64 else logits.float()


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
    seen = 0
    for x, y in batches:
        try:
            p, sp = predict_batch(model, x.to(device), samples, mode)
        except NonFiniteOutput as exc:  # the input's index in the whole pass, not in its batch
            raise exc.naming(seen) from None
        seen += len(y)
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


PASS_SEED = 0     # the Monte Carlo noise of a prediction pass: `ssvi evaluate --seed`'s default
PASS_BATCH = 500  # and its --batch-size: the draws depend on how the inputs are batched


@torch.no_grad()
def predict_pass(model: SSVIModel, dataset: torch.utils.data.Dataset, device: torch.device, samples: int,
                 mode: str = "mc", *, seed: int = PASS_SEED, batch_size: int = PASS_BATCH, keep_samples: bool = True,
                 on_batch=None, num_workers: int = 0) -> dict[str, Optional[Tensor]]:
    """:func:`predict_loader` over ``dataset`` in order, its draws seeded by ``seed`` and the global
    RNG left as it was: the pass ``ssvi evaluate`` makes and the one a run's summary reports, so
    ``ssvi evaluate RUN --samples S`` gives the numbers ``ssvi train`` printed at S = eval_samples
    (loader workers only read inputs: the draws are the same with any ``num_workers``)."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        batches = iter(loader)  # a DataLoader iterator draws its own base seed: seed after it
        torch.manual_seed(seed)
        return predict_loader(model, batches, device, samples, mode, keep_samples=keep_samples, on_batch=on_batch)


@dataclass(frozen=True)
class Prediction:
    """The Bayesian model average of ``samples`` draws (``None`` for the mean network)."""

    probs: Tensor                 # (N, C)
    entropy: Tensor               # (N,) predictive entropy, nats
    mutual_information: Optional[Tensor]  # (N,) epistemic part; None for the mean network and for one draw
    samples: Optional[int]

    def __repr__(self) -> str:  # a summary: the dataclass's own printed every value of every field
        mi = "None" if self.mutual_information is None else f"mean {float(self.mutual_information.mean()):.4g}"
        return (f"Prediction(probs {tuple(self.probs.shape)}, samples={self.samples}, entropy mean "
                f"{float(self.entropy.mean()):.4g}, mutual_information {mi})")


@torch.no_grad()
def predict(model: nn.Module, x: Tensor, samples: int = 30, mode: str = "mc") -> Prediction:
    """Monte Carlo prediction over the active weights (``mode="mean"``: theta = mu).

    The model's train/eval state and sampling mode are restored afterwards. A converted module
    (without ssvi's ``first``/``forward_rest`` split) samples every layer's weights per draw, once
    per forward (a layer called twice uses one draw). ``x`` is what the model takes (a tensor batch;
    numpy is refused), the model returns (batch, classes). Draws: torch's global RNG, ``samples``
    networks per call shared by the batch (a linear first layer's outputs may be drawn per example
    from their moments: docs/API.md)."""
    if not sparse_layers(model):
        raise ValueError("the model has no sparse Gaussian layers; convert it with ssvi_cli.sparsify first")
    unfilled(model, "predict with it")
    samples = whole("samples", samples) if samples is not None or mode == "mc" else None  # checked in mean mode too
    if x is None or isinstance(x, np.ndarray):
        raise TypeError(f"x is {'None' if x is None else 'a numpy array'}; pass a tensor batch"
                        + ("" if x is None else ", torch.as_tensor(x)"))
    if isinstance(x, (list, tuple)) and not any(isinstance(v, Tensor) for v in x):  # numbers, not the model's tensors
        raise TypeError(f"x is a {type(x).__name__} of numbers; pass a tensor batch, torch.tensor(x, dtype=torch.float32)")
    try:
        probs, draws = predict_batch(model, x, samples, mode)
    except IndexError as exc:  # a model that reads a batch dimension (flatten(1)) given one example
        if isinstance(x, Tensor) and x.dim() == 1:
            raise ValueError(f"x has shape {tuple(x.shape)}, one example: pass a batch, x.unsqueeze(0)") from exc
        raise
    except NonFiniteOutput as exc:  # an input's own NaN or inf, rather than the weights', where it is one
        if isinstance(x, Tensor) and x.is_floating_point() and exc.first < (len(x) if x.dim() else 0) \
                and not bool(x[exc.first].isfinite().all()):
            raise ValueError(f"the input at index {exc.first} of x holds NaN or inf: the model's outputs for it are "
                             "not finite") from None
        raise
    if probs.shape[-1] == 1:  # a softmax of one logit: probability 1, entropy and MI 0, whatever the model
        raise ValueError("the model has one output, whose softmax is 1 for every input: predict is for classifiers; "
                         "a regression head's draws: with ssvi.sampling(model): torch.stack([model(x) for _ in range(30)])")
    probs_np = probs.double().cpu().numpy()
    entropy = torch.from_numpy(predictive_entropy(probs_np))
    mi = torch.from_numpy(mutual_information(draws)) if has_spread(draws) else None  # a block at a time
    return Prediction(probs.contiguous(), entropy, mi, samples if draws is not None else None)  # mean mode's: a .T view
