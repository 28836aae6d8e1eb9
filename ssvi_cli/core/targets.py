"""Which layers :func:`ssvi_cli.sparsify` converts, and which it keeps as they are with the reason:
``nn.Linear``, ``nn.Conv2d`` and ``nn.Conv1d`` are converted unless a sparse layer could not stand in
for them (a weight another module reads directly or shares, non-zero padding, a subclass's own
forward or parameters) or the user excludes them; what a replacement would silently drop (hooks, a
parametrization) is refused. Any other module holding weights of its own is named among those kept."""

from __future__ import annotations

from fnmatch import fnmatchcase
from typing import Collection, Optional

from torch import nn

from ssvi_cli.core.attention import unsplittable
from ssvi_cli.core.carried import hook_kinds, reparametrized
from ssvi_cli.core.conv import SparseConv2d
from ssvi_cli.core.layers import SparseGaussian

TIED = "its weight is tied to"  # the start of a tied layer's reason in ``kept`` (modelfile.loading reads it)
OWN = "holds its own"  # in the reason of a module kept for weights it holds itself (no layer: dense= cannot name it)
EXCLUDED = "exclude="  # the reason of a layer sparsify(exclude=...) names
# Weight layers left dense and deterministic, named in the report's ``kept`` (as is an
# nn.MultiheadAttention that core.attention could not split: its in-projection is its own parameters).
CONVERTED = (nn.Linear, nn.Conv2d, nn.Conv1d)  # (in the order _own_behaviour tries them as a base class)
CONVERTED_NAMES = "Linear, Conv2d and Conv1d"
CONVOLUTIONS = (nn.Conv2d, nn.Conv1d, SparseConv2d)  # converted or not (SparseConv1d is a SparseConv2d)
UNCONVERTED = (nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Bilinear,
               nn.RNNBase, nn.RNNCellBase, nn.Embedding, nn.EmbeddingBag)


# Modules whose forward reads some children's weights directly, not through the children's forward:
# those children stay dense. By class name (subclasses included), or by module and class name where the
# class name alone says too little: torch's attention, torchvision's Swin window attention, and timm's
# EVA, BEiT and Swin V2 attention (their qkv read with a bias of its own, as they are built by default).
READ_DIRECTLY: dict[str, tuple[str, tuple[str, ...]]] = {
    "MultiheadAttention": ("nn.MultiheadAttention", ("out_proj",)),
    "ShiftedWindowAttention": ("Swin's ShiftedWindowAttention", ("qkv", "proj")),
    "ShiftedWindowAttentionV2": ("Swin's ShiftedWindowAttentionV2", ("qkv", "proj")),
    "timm.models.eva.EvaAttention": ("timm's EvaAttention", ("qkv",)),
    "timm.models.beit.Attention": ("timm's BEiT Attention", ("qkv",)),
    "timm.models.swin_transformer_v2.WindowAttention": ("timm's Swin V2 WindowAttention", ("qkv",)),
}
# Subclasses of the converted classes whose own forward computes what the base class's does (timm's Linear:
# F.linear outside TorchScript), converted as the base class is.
PLAIN_SUBCLASSES = ("timm.layers.linear.Linear",)
# Modules holding a linear layer's weight transposed, (in, out), applied as x @ weight + bias: transformers'
# Conv1D (GPT-2's attention and MLP), converted as an nn.Linear(in, out) holding weight.T. The class
# itself only: a subclass may compute otherwise.
TRANSPOSED_LINEAR = ("transformers.pytorch_utils.Conv1D",)


def _names(cls: type) -> tuple[str, str]:
    return cls.__name__, f"{cls.__module__}.{cls.__qualname__}"


def transposed_linear(module: nn.Module) -> bool:
    """A module of :data:`TRANSPOSED_LINEAR`, converted as the linear layer it is."""
    return _names(type(module))[1] in TRANSPOSED_LINEAR


def _reads_directly(module: nn.Module) -> Optional[tuple[str, tuple[str, ...]]]:
    """The :data:`READ_DIRECTLY` entry of the module's class or of a class it derives from."""
    return next((READ_DIRECTLY[n] for c in type(module).__mro__ for n in _names(c) if n in READ_DIRECTLY), None)


def _own_weights(module: nn.Module) -> list[str]:
    """The floating parameters of two or more dimensions a module holds itself (not a child's): weights
    it applies itself (timm's CondConv2d, a position embedding, a layer scale of shape (C, 1, 1))."""
    return [n for n, p in module.named_parameters(recurse=False) if p.is_floating_point() and p.dim() >= 2]


def _refuse_what_would_be_lost(name: str, module: nn.Module) -> None:
    """A layer with a parametrization (prune, weight_norm, spectral_norm) or hooks (on it, its weight or
    its bias) would lose them with its replacement, silently: refused, saying how to undo them."""
    if reparametrized(module):
        raise ValueError(f"layer {name!r} has a pruned or reparametrized weight or bias (torch.nn.utils.prune, weight_norm or "
                         "spectral_norm), which its sparse replacement would drop; make it permanent first "
                         "(prune.remove(module, 'weight'), torch.nn.utils.parametrize.remove_parametrizations or "
                         "remove_weight_norm)")
    hooks = hook_kinds(module)
    if hooks:
        raise ValueError(f"layer {name!r} has {' and '.join(hooks)} hooks, which its sparse replacement would not carry; "
                         "remove them before sparsify (handle.remove()) and register them on the converted layer")


def _own_behaviour(module: nn.Module) -> Optional[str]:
    """What a subclass of ``nn.Linear``/``nn.Conv2d``/``nn.Conv1d`` adds that a sparse layer would not
    carry: its own forward (timm's StdConv2d, Conv2dSame, quantization-aware layers) or parameters, buffers or
    submodules besides weight and bias (a learned scale, an adapter). None for the plain classes and a
    subclass that adds nothing (attention's NonDynamicallyQuantizableLinear)."""
    base = next((c for c in CONVERTED if isinstance(module, c)), None)
    cls = type(module)
    if _names(cls)[1] in PLAIN_SUBCLASSES or (base is None and "forward" not in vars(module)):
        return None  # (base None: a TRANSPOSED_LINEAR class)
    methods = [m for m in ("forward", "_conv_forward") if getattr(cls, m, None) is not getattr(base, m, None)]
    extra = [n for n, _ in module.named_parameters(recurse=False) if n not in ("weight", "bias")]
    extra += [n for n, _ in module.named_buffers(recurse=False)] + [n for n, _ in module.named_children()]
    if "forward" in vars(module):  # replaced on the instance (accelerate's hooks, a patch)
        return f"{cls.__name__} has its forward replaced on the instance, which a sparse layer would drop"
    if cls is base or not (methods or extra):
        return None
    what = ([f"its own {' and '.join(methods)}"] if methods else []) + ([f"its own {', '.join(extra)}"] if extra else [])
    return f"{cls.__name__} subclasses nn.{base.__name__} with {' and '.join(what)}, which a sparse layer would drop"


def first_conv(model: nn.Module) -> Optional[nn.Module]:
    """The model's first convolution (2-D or 1-D) in registration order (``model.modules()``), converted
    or not: the stem ``dense_first_conv`` keeps dense, whatever else keeps it as it is."""
    return next((m for m in model.modules() if isinstance(m, CONVOLUTIONS)), None)


def targets(model: nn.Module, stored: Collection[str] = (), exclude: Collection[str] = ()
            ) -> tuple[list[tuple[str, nn.Module]], list[tuple[str, str]]]:
    """The Linear/Conv2d/Conv1d modules to convert, and those that must stay (with the reason). A module
    registered under several names is listed once, under its first name (``_replace`` puts its
    sparse twin under every name). ``stored``: the layers a file stores as sparse, converted also
    when a subclass's own forward or parameters would keep them (a file from before ssvi kept them
    loads as it was trained: with the sparse layer in their place). ``exclude``: fnmatch patterns of
    layers left as they are."""
    targets, kept = [], []
    read_directly = {f"{n}.{child}" if n else child: f"{label} reads {child}.weight directly"
                     for n, m in model.named_modules() if (entry := _reads_directly(m)) is not None
                     for label, children in [entry] for child in children}
    owners: dict[int, list[str]] = {}  # parameter -> the modules holding it (a tied weight has several)
    aliases: dict[int, list[str]] = {}  # module -> its names (one registered twice has two)
    for name, module in model.named_modules(remove_duplicate=False):
        aliases.setdefault(id(module), []).append(name)
        for param in module.parameters(recurse=False):
            if name not in owners.setdefault(id(param), []):
                owners[id(param)].append(name)
    for name, module in model.named_modules():
        if isinstance(module, UNCONVERTED):
            kept.append((name, f"{type(module).__name__} is not converted ({CONVERTED_NAMES} are)"))
        elif isinstance(module, nn.MultiheadAttention):
            excluded = any(fnmatchcase(alias, p) for alias in aliases[id(module)] for p in exclude)
            kept.append((name, EXCLUDED if excluded else unsplittable(module, model) or
                         "nn.MultiheadAttention's in-projection weights are not converted"))
        elif not isinstance(module, (*CONVERTED, SparseGaussian)) and not transposed_linear(module) \
                and (own := _own_weights(module)):
            kept.append((name, f"{type(module).__name__} {OWN} {', '.join(own)}, kept as "
                               f"{'they are' if len(own) > 1 else 'it is'} ({CONVERTED_NAMES} are converted)"))
        if not (isinstance(module, CONVERTED) or transposed_linear(module)) or isinstance(module, SparseGaussian):
            continue
        if isinstance(module, nn.modules.lazy.LazyModuleMixin) and module.has_uninitialized_params():
            raise ValueError(f"layer {name!r} ({type(module).__name__}) has no shape yet; run one forward pass before sparsify")
        tied = [n for n in owners.get(id(module.weight), []) if model.get_submodule(n) is not module]
        if name in read_directly:
            kept.append((name, read_directly[name]))
        elif isinstance(module, (nn.Conv2d, nn.Conv1d)) and module.padding_mode != "zeros":
            kept.append((name, f"padding_mode={module.padding_mode!r} (only zero padding is supported)"))
        elif tied:
            kept.append((name, f"{TIED} {tied[0]}'s, which a sparse layer cannot share"))
        elif not reparametrized(module) and name not in stored and (own := _own_behaviour(module)) is not None:
            kept.append((name, own))  # (a pruned or parametrized layer is refused below, saying how to undo it)
        elif any(fnmatchcase(alias, p) for alias in aliases[id(module)] for p in exclude):  # any of its names
            kept.append((name, EXCLUDED))
        else:  # replaced: what the replacement would drop is refused (a layer kept keeps its hooks)
            _refuse_what_would_be_lost(name, module)
            targets.append((name, module))
    return targets, kept
