"""``ssvi.sampling``: how a converted model's sparse layers compute inside a ``with`` block, for loops
that draw networks themselves (a regression output, a model that does not return logits, anything
``ssvi.predict`` does not cover).

Outside any block a Bayesian sparse layer computes as in training, by local reparameterisation:
fresh noise for every output element of every example, which gives each output the right marginal
but is not one draw of the weights shared across a convolution's positions, a sequence's tokens or
the examples of a batch.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from torch import nn

from ssvi_cli.core.hooks import Hook
from ssvi_cli.core.layers import MODES, sparse_layers
from ssvi_cli.core.modes import one_draw_per_forward
from ssvi_cli.core.modes import sampling as _mode


@contextmanager
def sampling(model: nn.Module, mode: str = "sample") -> Iterator[nn.Module]:
    """Inside the block every sparse layer of ``model`` computes in ``mode``; afterwards each is back
    in the mode it had.

    - ``"sample"``: each call of ``model`` is one draw of the network's weights, shared by every
      example and position of the batch; a layer called twice in one forward (shared weights) uses
      one draw for both calls; a layer called directly, outside a call of ``model``, draws afresh at
      each call. Gradients flow through the draw (reparameterised), so it also trains; not under
      activation checkpointing of a block that calls a layer twice (its recomputation, outside the
      call of ``model``, draws that layer's second call afresh).
    - ``"mean"``: the mean network, θ = μ.
    - ``"lrt"``: training's local reparameterisation (the default outside a block).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"sampling takes the converted nn.Module, not a {type(model).__name__}")
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}; valid modes are: {', '.join(MODES)}"
                         + ("; the Monte Carlo average of S draws is ssvi.predict(model, x, samples=S)" if mode == "mc" else ""))
    if not sparse_layers(model):
        raise ValueError("the model has no sparse layer: convert it with ssvi.sparsify (or load it with ssvi.load) first")
    with _mode(model, mode):
        if mode != "sample":
            yield model
            return
        with one_draw_per_forward(model) as next_forward:
            inside = [0]  # calls of the model under way (a model may call itself)

            def enter(*_args) -> None:
                if not inside[0]:
                    next_forward()
                inside[0] += 1

            def leave(*_args) -> None:
                inside[0] = max(0, inside[0] - 1)
                if not inside[0]:
                    next_forward()

            def after_layer(*_args) -> None:  # a layer called on its own: no draw kept for its next call
                if not inside[0]:
                    next_forward()

            # enter first of the pre-hooks: leave runs even when a later one raises (always_call). As
            # Hooks, a copy of the model made in the block (deepcopy, torch.save) gets hooks that do nothing.
            handles = [model.register_forward_pre_hook(Hook(enter), prepend=True),
                       model.register_forward_hook(Hook(leave), always_call=True)]
            handles += [layer.register_forward_hook(Hook(after_layer), always_call=True)
                        for _, layer in sparse_layers(model) if layer is not model]
            try:
                yield model
            finally:
                for handle in handles:
                    handle.remove()
