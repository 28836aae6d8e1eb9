"""Any ``nn.Module`` as a sparse BNN: every ``nn.Linear``, ``nn.Conv2d`` and ``nn.Conv1d`` (and each
``nn.MultiheadAttention``'s projections, once ``core.attention`` has split it) becomes a sparse
Gaussian layer of the same geometry, in place; everything else (BatchNorm, LayerNorm, embeddings,
free parameters, a weight tied to another module's) stays as it is, deterministic.

From trained weights (the practical way to a BNN of a big model) the initial support of a layer is
its ``round(density * n)`` largest ``|w|`` entries (ties to the lower flat index), ``mu = w`` there,
and ``sigma`` either the configured ``|N(sigma_mean, sigma_std^2)|`` or MOPED-style
``sigma = delta * |w|``. At sparsity 0 in ``mean`` mode the converted model computes exactly what
the original did; at sparsity s it computes the magnitude-pruned original.
"""

from __future__ import annotations

import fnmatch
import logging
from typing import Any, Collection, Iterable, Optional

import torch
from torch import nn

from ssvi_cli.argcheck import real
from ssvi_cli.config import BayesConfig, SparseConfig
from ssvi_cli.core.allocation import InitSpec, active_count, initialise, kept_dense_weights, layer_densities
from ssvi_cli.core.attention import SplitMultiheadAttention, split_attention
from ssvi_cli.core.criteria import top_k_indices
from ssvi_cli.core.gaussian import HALF_SIGMA, rho_from_sigma
from ssvi_cli.core.conv import SparseConv1d, SparseConv2d
from ssvi_cli.core.conversion_report import ConversionReport, ConvertedLayer
from ssvi_cli.core.layers import SparseGaussian, SparseLinear, sparse_layers
from ssvi_cli.core.replaced import mark_replaced
from ssvi_cli.core.targets import EXCLUDED, OWN, first_conv as model_stem, targets as convertible, transposed_linear

log = logging.getLogger(__name__)

SIGMA_FLOOR = 1e-8
def _patterns(patterns: str | Iterable[str], arg: str) -> tuple[str, ...]:
    """Module-name patterns: one string is one pattern (not its characters)."""
    if isinstance(patterns, str):
        return (patterns,)
    items = tuple(patterns) if isinstance(patterns, Iterable) else None
    if items is None or not all(isinstance(p, str) for p in items):
        raise TypeError(f"{arg}={patterns!r}: give module-name patterns, one string or several (e.g. {arg}=('fc',))")
    return items


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _sparse_twin(module: nn.Module, bayesian: bool, stem: bool, sigma_param: str, kernel: str) -> SparseGaussian:
    common: dict[str, Any] = {"bias": module.bias is not None, "bayesian": bayesian,
                              "sigma_param": sigma_param, "stem": stem, "kernel": kernel}
    if isinstance(module, (nn.Conv2d, nn.Conv1d)):
        cls = SparseConv2d if isinstance(module, nn.Conv2d) else SparseConv1d
        return cls(module.in_channels, module.out_channels, module.kernel_size, stride=module.stride,
                            padding=module.padding, dilation=module.dilation, groups=module.groups, **common)
    if transposed_linear(module):  # weight (in, out)
        return SparseLinear(module.weight.shape[0], module.weight.shape[1], **common)
    return SparseLinear(module.in_features, module.out_features, **common)


def sparsify(model: nn.Module, sparsity: float = SparseConfig.sparsity, *, bayesian: bool = True,
             dense: str | Iterable[str] = (), deterministic: str | Iterable[str] = (), exclude: str | Iterable[str] = (),
             dense_first_conv: bool = True,
             allocation: str = SparseConfig.allocation, from_weights: bool = True,
             sigma_mean: float = BayesConfig.sigma_init_mean, sigma_std: float = BayesConfig.sigma_init_std,
             moped_delta: Optional[float] = None, sigma_param: str = BayesConfig.sigma_param, kernel: str = "auto",
             generator: Optional[torch.Generator] = None, structure_only: bool = False,
             _stored: Collection[str] = (), _say_kept: bool = True, _split_attention: bool = True) -> ConversionReport:
    """Convert ``model`` in place, each new layer on its weight's device and in its dtype; returns
    the per-layer report (what stays as it is, and why, in ``kept``).

    ``dense`` / ``deterministic``: fnmatch patterns (one string, or several) of module names kept
    at density 1 (still Bayesian) / without sigma; ``exclude``: left as they are (a layer whose
    ``.weight`` another module reads itself); a pattern that matches no layer is an error.
    ``dense_first_conv``: the first ``Conv2d`` or ``Conv1d`` (the stem) stays dense. A layer whose weight does not
    require gradients stays frozen: its mu, rho and bias do not either, and :class:`ssvi_cli.Subspace`
    leaves its support as it is.
    ``from_weights``: support and mu from the current weights (else a random support with a fan-in
    init). ``generator``: the random support, mu and sigma draws (default: seeded from torch's global
    RNG, so ``torch.manual_seed`` decides them). ``moped_delta``: sigma = delta * |w| instead of ``|N(sigma_mean, sigma_std^2)|``.
    Works on a model built on the ``meta`` device (shapes and counts only). ``structure_only``:
    replace the layers and leave their supports empty (for a file or checkpoint to fill). Each
    ``nn.MultiheadAttention`` is first split into its four projection layers (``core.attention``), which
    convert as any ``nn.Linear`` (one that ``exclude`` names stays whole; ``_split_attention=False``: the
    attention of a file that stores it whole).
    """
    given = dict(locals())
    if not isinstance(model, nn.Module):
        raise TypeError(f"sparsify converts an nn.Module, not a {type(model).__name__}")
    kept_whole = _patterns(exclude, "exclude")  # an attention exclude= names is kept whole, not split
    undo = split_attention(model, lambda name: not _matches(name, kept_whole)) if given.pop("_split_attention") \
        else (lambda: None)
    try:
        return _convert(**given)
    except BaseException:  # a conversion that fails leaves the model as it was: attention put back too
        undo()
        raise


def _convert(model: nn.Module, sparsity: float, *, bayesian: bool, dense: str | Iterable[str],
             deterministic: str | Iterable[str], exclude: str | Iterable[str], dense_first_conv: bool, allocation: str,
             from_weights: bool, sigma_mean: float, sigma_std: float, moped_delta: Optional[float], sigma_param: str,
             kernel: str, generator: Optional[torch.Generator], structure_only: bool, _stored: Collection[str],
             _say_kept: bool) -> ConversionReport:
    """:func:`sparsify` once the attention modules are split."""
    for arg, flag in (("bayesian", bayesian), ("from_weights", from_weights), ("dense_first_conv", dense_first_conv),
                      ("structure_only", structure_only)):
        if not isinstance(flag, bool):
            raise TypeError(f"{arg}={flag!r}: give True or False")
    sparsity = real("sparsity", sparsity)
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity={sparsity} must be in [0, 1)")
    if generator is not None and not isinstance(generator, torch.Generator):  # before any layer is replaced
        raise TypeError(f"generator={generator!r}: give a torch.Generator (torch.Generator().manual_seed(5)), or "
                        "None to draw from torch's global RNG (torch.manual_seed)")
    _check_sigma_init(sigma_mean, sigma_std, moped_delta)
    if moped_delta is not None and not from_weights:
        raise ValueError("moped_delta sets sigma from the trained weights (moped_delta * |w|), and from_weights=False "
                         "uses none; drop moped_delta, or convert from the weights")
    dense, deterministic = _patterns(dense, "dense"), _patterns(deterministic, "deterministic")
    exclude = _patterns(exclude, "exclude")
    targets, kept = convertible(model, _stored, exclude)  # _stored: a file's sparse layers (ssvi.load)
    aliases: dict[int, list[str]] = {}  # a module registered under several names answers to each
    for n, m in model.named_modules(remove_duplicate=False):
        aliases.setdefault(id(m), []).append(n)
    names = {name: aliases[id(module)] for name, module in targets}
    excluded = [a for n, why in kept if why == EXCLUDED for a in aliases[id(model.get_submodule(n))]]
    if unmatched := next((p for p in exclude if not any(_matches(a, (p,)) for a in excluded)), None):
        raise ValueError(f"exclude: {unmatched!r} matches no Linear, Conv2d or Conv1d layer that sparsify would convert "
                         f"(they are: {', '.join(n for n, _ in targets[:8])}{', ...' if len(targets) > 8 else ''})")

    def hit(name: str, patterns: Iterable[str]) -> bool:
        return any(_matches(n, patterns) for n in names[name])

    if not structure_only:  # a typo would silently leave a layer sparse or Bayesian
        for arg, patterns in (("dense", dense), ("deterministic", deterministic)):
            unmatched = next((p for p in patterns if not any(hit(n, (p,)) for n, _ in targets)  # a kept layer is dense already
                              and not any(_matches(n, (p,)) for n, why in kept if OWN not in why)), None)
            if unmatched is not None:
                split = next((n for n, m in model.named_modules() if isinstance(m, SplitMultiheadAttention)
                              and _matches(n, (unmatched,))), None)
                raise ValueError(f"{arg}: {unmatched!r} matches no Linear, Conv2d or Conv1d layer that sparsify converts "
                                 + (f"but names the attention {split}, whose layers are {split}.q_proj, .k_proj, .v_proj "
                                    f"and .out_proj: {unmatched + '.*'!r} names them" if split else
                                    f"(they are: {', '.join(n for n, _ in targets[:8])}{', ...' if len(targets) > 8 else ''})"))
    if not targets and sparse_layers(model):
        converted = len(sparse_layers(model))
        raise ValueError(f"the model is already sparse ({converted} layer{'s were' if converted > 1 else ' was'} converted before) "
                         "and has no Linear, Conv2d or Conv1d layer left to convert")
    if not targets and not structure_only:  # (a file's reader names a layer that stays dense itself)
        left = "; ".join(f"{name or '(the model itself)'}: {reason}" for name, reason in kept[:3])
        raise ValueError("the model has no Linear, Conv2d or Conv1d layer that sparsify converts" + (f" ({left})" if left else ""))
    half = next((name for name, m in targets if m.weight.dtype == torch.float16), None)
    if half is not None and bayesian:
        raise ValueError(f"{half} has float16 weights, which {HALF_SIGMA}")
    if any(name == "" for name, _ in targets):
        raise ValueError("sparsify converts the layers inside a model; wrap a lone layer in nn.Sequential")
    stem = model_stem(model)  # not the first of those converted: one kept as is, or converted before, is the stem
    first_conv = next((n for n, m in targets if m is stem), None)
    twins: list[tuple[str, SparseGaussian, nn.Module]] = []
    for name, module in targets:
        twin = _sparse_twin(module, bayesian and not hit(name, deterministic),
                            dense_first_conv and name == first_conv, sigma_param, kernel)
        weight = module.weight
        twin = twin.to(weight.device, weight.dtype if weight.is_floating_point() else None)
        for param in (twin.mu, twin.rho):  # a frozen layer stays frozen (Subspace then keeps its support)
            if param is not None:
                param.requires_grad_(weight.requires_grad)
        if module.bias is not None:
            twin.bias.requires_grad_(module.bias.requires_grad)
        twins.append((name, twin, module))
    if structure_only:
        for name, twin, _ in twins:
            _replace(model, name, twin)
        return ConversionReport([ConvertedLayer(n, t.KIND, t.weight_shape, 0, t.numel, t.bayesian, False)
                                 for n, t, _ in twins], kept)
    densities = layer_densities([(n, t) for n, t, _ in twins], 1.0 - sparsity, allocation, dense_first_conv,
                                whole={n for n, _, _ in twins if hit(n, dense)})
    if sparsity > 0 and all(densities[n] >= 1.0 for n, _, _ in twins):  # nothing sparse: the stem or dense= only
        why = "; ".join(f"{n}: dense=" if hit(n, dense) else f"{n}: the stem, dense_first_conv=True"
                        for n, _, _ in twins[:4]) + ("; ..." if len(twins) > 4 else "")
        log.warning("sparsify(sparsity=%g) keeps every layer it converts dense (%s): the model has no sparse weight",
                    sparsity, why)
    # Without a generator, torch.manual_seed decides, as it does for nn.init: one draw seeds our own.
    gen = generator or torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,)).item()))
    # Every support first, then every replacement: a failure on the way (out of memory, say) leaves
    # the model as it was, not half converted.
    if from_weights:
        for name, twin, module in twins:
            _support_from_weights(twin, module, densities[name], sigma_mean, sigma_std, moped_delta, gen)
    else:
        holder = nn.ModuleList([t for _, t, _ in twins])
        initialise(holder, {str(i): densities[n] for i, (n, _, _) in enumerate(twins)},
                   InitSpec(sigma_mean=sigma_mean, sigma_std=sigma_std, sigma_param=sigma_param), gen)
    for name, twin, _ in twins:
        _replace(model, name, twin)
    if kept and _say_kept:  # outside the posterior and the sparsity: said where the report is not printed (ssvi train notes it)
        held = kept_dense_weights(model)  # the kept modules' matrices, a tied or shared one once
        converting = sum(t.numel for _, t, _ in twins)
        log.warning("sparsify keeps %d module%s with weights as %s, deterministic and dense (%s weights, %.1f%% of the "
                    "weights it converted or kept): %s; the report's kept lists them (docs/API.md, \"What sparsify "
                    "leaves as it is\")", len(kept), "s" * (len(kept) > 1), "they are" if len(kept) > 1 else "it is",
                    f"{held:,}", 100 * held / max(held + converting, 1),
                    "; ".join(f"{n or '(the model itself)'} ({r})" for n, r in kept[:3]) + ("; ..." if len(kept) > 3 else ""))
    report = ConversionReport(kept=kept)
    for name, twin, module in twins:
        report.layers.append(ConvertedLayer(name, twin.KIND, twin.weight_shape, twin.active, twin.numel, twin.bayesian,
                                            densities[name] >= 1.0))
    return report


def unfilled(model: nn.Module, doing: str) -> None:
    """Refuse to ``doing`` a model with an empty sparse layer: ``structure_only`` leaves them so for a
    file or state dict to fill (a conversion gives every layer at least one weight), and a loop that
    forgot that step, or loaded a state dict without some layers, would train and predict without
    them (uniform probabilities, where every one is empty) and save them empty, without a word."""
    layers = sparse_layers(model)
    empty = [name for name, layer in layers if layer.active == 0 and layer.numel]
    if empty:
        what = ("every sparse layer of the model is empty" if len(empty) == len(layers) else
                f"{'layers' if len(empty) > 1 else 'layer'} {', '.join(empty[:4])}{', ...' if len(empty) > 4 else ''} "
                f"of the model {'are' if len(empty) > 1 else 'is'} empty")
        raise ValueError(f"cannot {doing}: {what}, as sparsify(..., structure_only=True) leaves them for a file or "
                         "checkpoint to fill; fill it first (ssvi_cli.load(path, model=model) or "
                         "model.load_state_dict(state), with every layer), or convert it without structure_only")


def _check_sigma_init(sigma_mean: float, sigma_std: float, moped_delta: Optional[float]) -> None:
    """sigma is |N(sigma_mean, sigma_std^2)| or moped_delta * |w|: each a positive scale (a zero or
    negative one would leave sigma at its floor, or as large as |sigma_mean|, without a word)."""
    if moped_delta is not None and not real("moped_delta", moped_delta) > 0:
        raise ValueError(f"moped_delta={moped_delta} must be positive (sigma = moped_delta * |w|)")
    if not real("sigma_mean", sigma_mean) > 0 or not real("sigma_std", sigma_std) >= 0:
        raise ValueError(f"sigma_mean={sigma_mean}, sigma_std={sigma_std}: sigma_mean must be positive "
                         "and sigma_std at least 0")


def _support_from_weights(twin: SparseGaussian, module: nn.Module, density: float, sigma_mean: float,
                          sigma_std: float, moped_delta: Optional[float], gen: torch.Generator) -> None:
    weight = module.weight.detach().t() if transposed_linear(module) else module.weight.detach()
    k = active_count(twin.numel, density)
    if weight.is_meta:  # shapes only: a support of the right size, no values
        empty = torch.empty(k, device="meta")
        twin.set_support(torch.empty(k, dtype=torch.long, device="meta"), empty, empty if twin.bayesian else None)
    else:
        flat = weight.reshape(-1)
        idx = top_k_indices(flat.abs().float(), k)  # ascending, ties to the lower index
        mu = flat[idx]
        rho = None
        if twin.bayesian:
            if moped_delta is not None:
                sigma = (moped_delta * mu.abs()).clamp_min(SIGMA_FLOOR)
            else:
                noise = torch.randn(k, generator=gen).to(mu.device)
                sigma = (sigma_mean + sigma_std * noise).abs().clamp_min(SIGMA_FLOOR)
            rho = rho_from_sigma(sigma, twin.sigma_param)
        twin.set_support(idx, mu, rho)
    if module.bias is not None:
        twin.bias.data = module.bias.detach().clone().to(twin.bias.dtype)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where the module ``name`` is, under each name that module is registered as; the
    weights taken out are marked (``core.replaced``: an optimizer still holding them is refused)."""
    old = model.get_submodule(name)
    mark_replaced(old, name)
    for alias, module in list(model.named_modules(remove_duplicate=False)):
        if module is old:
            parent_name, _, child = alias.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    # torch's transformer encoders have an inference fast path that reads linear1.weight and
    # linear2.weight, which a sparse layer does not have. These attributes only gate that path (the
    # activation and the nesting of inputs are unchanged).
    for module in model.modules():
        if isinstance(module, nn.TransformerEncoderLayer) and new in (module.linear1, module.linear2):
            module.activation_relu_or_gelu = False
        elif isinstance(module, nn.TransformerEncoder) and any(
                new in (layer.linear1, layer.linear2) for layer in module.layers):
            module.use_nested_tensor = False
