"""How much the removal criteria agree: the IoU of the entries each would drop from the current
supports. Recorded at up to ten subspace steps of a run, spread from its first to the last that
drops an entry (``support.jsonl``; ``Schedule.records_overlap``), and shown by ``ssvi inspect``; the
sweep report's early/middle/late table (the paper's Table 4) reads it back.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import Tensor

from ssvi_cli.core.criteria import criterion_names, keep_mask, ranking_score
from ssvi_cli.core.layers import sparse_layers


def criteria_overlap(model: torch.nn.Module, fraction: float = 0.3, lam: float = 1.0) -> Optional[dict[str, Any]]:
    """IoU between the sets of entries each removal criterion would drop now, at drop ``fraction``.

    Per layer every criterion drops the ``floor(fraction * active)`` lowest-scoring active entries
    (as the subspace step does); the IoU of two criteria is ``sum |A_l & B_l| / sum |A_l | B_l|``
    over layers, and 1 where no criterion drops anything (``dropped``, the entries each drops over
    all layers, is then 0: a fraction too small for any layer's active count). Layers with every
    weight active are left out (no step drops from them); None where no Bayesian layer is left.
    """
    layers = [(n, l) for n, l in sparse_layers(model) if l.bayesian and l.active < l.numel]
    if not layers:
        return None
    names = criterion_names()
    drops: dict[str, list[Tensor]] = {c: [] for c in names}
    dropped = 0
    for _, layer in layers:
        k = int(math.floor(fraction * layer.active))
        dropped += k
        mu, sigma = layer.mu.detach().cpu(), layer.sigma().detach().cpu()
        for c in names:
            drops[c].append(~keep_mask(ranking_score(c, mu, sigma, lam), layer.active - k))
    matrix = []
    for a in names:
        row = []
        for b in names:
            inter = sum(int((x & y).sum()) for x, y in zip(drops[a], drops[b]))
            union = sum(int((x | y).sum()) for x, y in zip(drops[a], drops[b]))
            row.append(inter / union if union else 1.0)
        matrix.append(row)
    return {"fraction": fraction, "lambda": lam, "dropped": dropped, "criteria": names, "iou": matrix}
