"""The dense leaves of a layer's capture forwards, and the sum of their gradients.

In capture mode (:func:`ssvi_cli.core.modes.capturing_dense_grad`) a layer's forward runs through a
dense leaf holding μ, so that backward yields ∂L/∂μ of the data term at every position. A loop that
accumulates gradients runs several such forwards (micro-batches) before it collects: each forward gets its own
leaf, and the gradients of all of them are summed, as autograd sums a parameter's gradient over
several backward passes. A leaf whose gradient has arrived is folded into the sum when the next
forward starts, so at most one dense sum is kept besides the leaves still in a graph.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor


class CapturedGrad:
    """Leaves handed out since the last :meth:`take`, and the sum of the gradients they received."""

    def __init__(self) -> None:
        self._leaves: list[Tensor] = []
        self._total: Optional[Tensor] = None

    def new_leaf(self, dense: Tensor) -> Tensor:
        """``dense`` (detached, flat) as a fresh leaf that records its gradient."""
        self._fold()
        leaf = dense.requires_grad_(True)
        self._leaves.append(leaf)
        return leaf

    def take(self) -> Optional[Tensor]:
        """The summed gradient of every leaf since the last call (None if none received one); a
        leaf whose forward had no backward is dropped."""
        self._fold()
        total, self._total = self._total, None
        self._leaves = []
        return total

    def _fold(self) -> None:
        waiting = []
        for leaf in self._leaves:
            if leaf.grad is None:
                waiting.append(leaf)
            else:
                grad = leaf.grad.detach()
                self._total = grad if self._total is None else self._total + grad
        self._leaves = waiting
