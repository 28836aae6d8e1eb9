"""What torch's own machinery meets in a sparse layer, answered for the user: a copy or a pickle,
TorchScript, and code that reads ``.weight``."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ssvi_cli.core.capture import CapturedGrad


class TorchInterop:
    """Mixed into :class:`ssvi_cli.core.layers.SparseGaussian` (before ``nn.Module``)."""

    def __getstate__(self) -> dict:
        """A copy (deepcopy, pickle) starts outside any capture, which belongs to the original's
        Subspace, and outside any block of :mod:`ssvi_cli.core.modes` (in ``lrt`` mode, without draws):
        the block restores the original's layers alone, so a copy made inside one stayed in its mode."""
        state = dict(super().__getstate__())  # type: ignore[misc]  # a copy: the original stays as it is
        state.update(capture_dense_grad=False, dense_grad=None, _captured=CapturedGrad(), mode="lrt", draws=None,
                     forward_draw=None)
        return state

    def __getattr__(self, name: str) -> Tensor | nn.Module:
        try:
            return super().__getattr__(name)  # type: ignore[misc]  # one a user registers (a "weight" buffer) too
        except AttributeError:
            if name != "weight":  # code written for nn.Linear / nn.Conv2d reads it
                raise
        raise AttributeError(f"{type(self).__name__} has no dense .weight: its weights are mu (and rho) at the positions idx "
                             "(layer.to_dense(layer.mu) is the dense posterior mean); a module that reads a layer's .weight "
                             "itself needs the layer left as it is, sparsify(..., exclude=[NAME])")

    def __prepare_scriptable__(self) -> Any:
        """torch.jit.script calls this first: TorchScript does not compile these layers (their sampling
        modes are Python state), and its own error named a line of their code."""
        raise TypeError(f"torch.jit.script does not compile ssvi's sparse layers ({type(self).__name__}); for the mean "
                        "network, torch.export.export the model inside ssvi.sampling(model, 'mean'); torch.compile "
                        "compiles it in every mode")
