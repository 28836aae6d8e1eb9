"""Training methods as objects (README, the `--method` table): what each one trains, decided here once.

A method answers three questions that the trainer, the FLOPs count and the file writer ask:
is the network Bayesian (has σ), is it dense (density 1 whatever the sparsity), and does its
support move during training (subspace steps).
"""

from __future__ import annotations

from dataclasses import dataclass

from ssvi_cli.registry import Registry


@dataclass(frozen=True)
class Method:
    name: str
    bayesian: bool
    dense: bool
    moves_support: bool
    summary: str

    def density(self, sparsity: float) -> float:
        """Target density of the sparse layers for ``sparsity``."""
        return 1.0 if self.dense else 1.0 - sparsity

    def ignores(self, key: str) -> bool:
        """Whether config ``key`` cannot change what this method trains (a sweep runs such a method
        once over that key's values): the support schedule where the support does not move, the
        removal criterion and σ of new weights without σ, the allocation of a dense network, and
        every σ and KL setting of a deterministic one."""
        return ((not self.moves_support and key in SCHEDULE_KEYS)
                or (not self.bayesian and key in SIGMA_KEYS)
                or (self.dense and key == "sparse.allocation"))

    def never_uses(self, key: str) -> bool:
        """Whether a run of this method never uses config ``key``: those it :meth:`ignores`, and a dense
        network's sparsity and stem (it has no sparse layer), which a sweep does not count as cells."""
        return self.ignores(key) or (self.dense and key in DENSE_IGNORES)


# Config keys that act only through the remove-and-add steps, and only through σ (the removal
# criterion ranks by SNR-type scores only with σ: a deterministic network's removal is |w|).
SCHEDULE_KEYS = frozenset({"sparse.criterion", "sparse.criterion_lambda", "sparse.addition", "sparse.delta_t",
                           "sparse.min_subspace_steps", "sparse.alpha", "sparse.t_end", "sparse.new_sigma"})
DENSE_IGNORES = frozenset({"sparse.sparsity", "model.dense_stem"})  # a dense method has no sparse layer
SIGMA_KEYS = frozenset({"sparse.criterion", "sparse.criterion_lambda", "sparse.new_sigma", "bayes.beta",
                        "bayes.prior_sigma", "bayes.sigma_param", "bayes.sigma_init_mean", "bayes.sigma_init_std",
                        "bayes.kl_warmup", "optim.lr_sigma"})


METHODS: Registry[Method] = Registry("method", sort=False)
for _m in (
    Method("ssvi", bayesian=True, dense=False, moves_support=True,
           summary="sparse Bayesian network; the support moves every delta_t steps"),
    Method("vi", bayesian=True, dense=True, moves_support=False,
           summary="dense Bayesian network (mean-field, LRT)"),
    Method("static", bayesian=True, dense=False, moves_support=False,
           summary="sparse Bayesian network on a random support fixed at initialisation"),
    Method("rigl", bayesian=False, dense=False, moves_support=True,
           summary="deterministic sparse network: |w| removal, gradient addition"),
    Method("dense", bayesian=False, dense=True, moves_support=False,
           summary="deterministic dense network"),
):
    METHODS.add(_m.name, _m)
