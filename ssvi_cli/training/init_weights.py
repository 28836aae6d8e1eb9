"""``model.init_from``, read: the weights a torchvision model's posterior starts from, checked against
the architecture the run builds (``num_classes`` and the first conv's channels adapted to the data).

Two sources. A file: a ``state_dict`` of the deterministic model, as ``.pt`` (read with
``torch.load(..., weights_only=True)``) or ``.safetensors``. Or ``torchvision:WEIGHTS``: the builder's
published weights, fetched through torch.hub's cache. Both are adapted alike (``training.pretrained``):
a head for another number of classes (the file's read from its head) is left out, to be
re-initialised, as is one a file does not hold (a backbone saved alone), and the stem kernel adapted
to the data's channels; a file trained for this data loads as it is. Every other key and shape must
match; the first mismatching key is named. ``training.init_from`` builds the model from the result.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor, nn

from ssvi_cli.config import Config, ConfigError
from ssvi_cli.data.spec import DataSpec
from ssvi_cli.machine import quote_path
from ssvi_cli.models import AUX_HEADS, TORCHVISION, torchvision_base
from ssvi_cli.modelfile.header import ZIP_MAGIC, ZIP_WORDS, zip_kind
from ssvi_cli.runs.checkpoint import FORMAT as CHECKPOINT_FORMAT
from ssvi_cli.runs.checkpoint import holds_objects, torch_load_tensors, unpickler_reason
from ssvi_cli.training.pretrained import adapt_state, fetch_state_dict, resolve_weights

logger = logging.getLogger(__name__)

# Keys under which a training checkpoint holds the network's state_dict, in the order they are tried.
CHECKPOINT_KEYS = ("state_dict", "model_state_dict", "model", "net")
# Key prefixes of a wrapped model's state_dict (DataParallel/DistributedDataParallel, torch.compile),
# taken off when every key has one.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
STEP_COUNTER = "num_batches_tracked"  # BatchNorm's step counter: not a weight, and filled in where a file lacks it


@dataclass(frozen=True)
class InitWeights:
    """The checked weights a run starts from; ``source`` is the file or the resolved
    ``torchvision:Enum_Weights.NAME``; ``reinitialised`` the keys left out of ``state`` (the head)."""

    state: dict[str, Tensor]
    source: str
    reinitialised: tuple[str, ...] = ()
    stem: Optional[str] = None
    left_out: Optional[str] = None  # what of the state the run does not use, said
    head_note: Optional[str] = None  # why the head is re-initialised

    def describe(self) -> str:
        """One line: what was loaded, adapted and re-initialised."""
        loaded = sum(not k.endswith(STEP_COUNTER) for k in self.state)  # as check_state_dict counts them
        parts = [f"init from {self.source}: {loaded} tensors loaded"]
        parts += [p for p in (self.stem, self.left_out) if p]
        if self.reinitialised:
            parts.append(f"head re-initialised ({', '.join(self.reinitialised)}"
                         + (f": {self.head_note}" if self.head_note else "") + ")")
        return "; ".join(parts)


def published_weights(cfg: Config) -> tuple[Any, str]:
    """The torchvision weights ``torchvision:NAME`` of ``model.init_from`` names (``DEFAULT`` allowed),
    and the source a run records for them: ``torchvision:Enum_Weights.NAME``, the version resolved."""
    weights = resolve_weights(cfg.model.name[len(TORCHVISION):], str(cfg.model.init_from)[len(TORCHVISION):])
    return weights, f"{TORCHVISION}{weights!r}"


def check_init_source(cfg: Config) -> str:
    """``cfg.model.init_from`` checked without reading it: a path that exists, or torchvision's
    published weights for a torchvision:NAME model. Returns it as a string."""
    source = str(cfg.model.init_from)
    if not source.startswith(TORCHVISION) and not Path(source).expanduser().exists():
        raise ConfigError(f"--init-from {source}: no such file or run directory")
    if source.startswith(TORCHVISION) and not cfg.model.name.startswith(TORCHVISION):
        raise ConfigError(f"--init-from {source} names torchvision's published weights, which start only a "
                          f"torchvision:NAME model, not {cfg.model.name!r}")
    return source


def load_init_weights(cfg: Config, spec: DataSpec, progress: bool = False) -> InitWeights:
    """``cfg.model.init_from`` read (or fetched), adapted to the data (head, stem) and checked against
    the run's architecture; reads no data and writes nothing but torch.hub's cache."""
    source = check_init_source(cfg)
    with torch.device("meta"):
        model = base_for(cfg, spec)
    if not source.startswith(TORCHVISION):
        state = read_state_dict(Path(source))
        # torchvision's default GoogLeNet and Inception v3 carry auxiliary classifiers, which ssvi builds
        # without (as for published weights): their keys are left out, and the run says so.
        own = model.state_dict()
        head = _head_keys(cfg, spec, own)
        state, inner = _inner_network(state, own, Path(source), optional=head)
        aux = sorted({k.split(".")[0] for k in state if k.startswith(AUX_HEADS) and k not in own})
        state = {k: v for k, v in state.items() if not k.startswith(tuple(f"{a}." for a in aux))}
        notes = [inner, f"auxiliary classifiers left out ({', '.join(aux)}: ssvi builds the network without them)"
                 if aux else None]
        label, left_out = source, "; ".join(n for n in notes if n) or None
        held = [k for k in head if k in state and state[k].dim() >= 1]  # the file's head: its classes
        classes = int(state[held[0]].shape[0]) if held else spec.num_classes
    else:
        weights, label = published_weights(cfg)
        classes, left_out = len(weights.meta.get("categories") or ()) or spec.num_classes, None
        state, head = fetch_state_dict(weights, progress), ()
    with torch.device("meta"):
        reference = torchvision_base(cfg.model.name[len(TORCHVISION):], spec.input_shape, classes)
    adapted = adapt_state(state, model, reference)
    absent = head if head and not any(k in state for k in head) else ()  # a backbone saved without its head
    check_state_dict(model, adapted.state, label, skip=adapted.head or absent)
    why = f"the weights' head is for {classes} classes" if adapted.head else "not in the file" if absent else None
    init = InitWeights(adapted.state, label, adapted.head or absent, adapted.stem, left_out, why)
    logger.info("%s", init.describe())
    return init


def _head_keys(cfg: Config, spec: DataSpec, own: dict[str, Any]) -> tuple[str, ...]:
    """The keys of the run's model (``own``, its state_dict) whose shape follows the number of classes
    (the head): the first dimension of each is the number of classes."""
    with torch.device("meta"):
        other = torchvision_base(cfg.model.name[len(TORCHVISION):], spec.input_shape, spec.num_classes + 1).state_dict()
    return tuple(k for k, v in own.items() if k in other and other[k].shape != v.shape)


def _checkpoint_records() -> Any:
    """The one object besides tensors that training checkpoints commonly hold, read as plain data: the
    script's ``argparse.Namespace`` (torchvision's reference scripts save their ``args``). Nothing
    else is let through, and nothing is run."""
    import argparse
    from contextlib import nullcontext

    allow = getattr(torch.serialization, "safe_globals", None)  # torch >= 2.5
    return allow([argparse.Namespace]) if allow is not None else nullcontext()


def read_state_dict(path: Path) -> dict[str, Tensor]:
    """A state_dict from ``.pt`` (weights only) or ``.safetensors``; a clear error for anything else."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"--init-from {path}: no such file")
    try:
        if path.suffix.lower() == ".safetensors":
            from ssvi_cli.modelfile.reader import load_safetensors

            state = load_safetensors(path)
        else:
            with _checkpoint_records():
                state = torch_load_tensors(path)
    except Exception as exc:  # noqa: BLE001 - any reader failure is one message naming the file
        first = unpickler_reason(exc)  # what torch's weights-only reader met, not its advice (else its first line)
        try:
            with open(path, "rb") as handle:
                magic = handle.read(4)
        except OSError:
            magic = ZIP_MAGIC  # unreadable: the reader's own error says why
        if path.suffix.lower() == ".safetensors":  # not torch.save's: its reader's own words
            first = "not a readable safetensors file: " + (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        elif not (magic.startswith(ZIP_MAGIC) or magic[:1] == b"\x80"):
            first = "not a PyTorch file: neither a zip archive nor a pickle"
        elif magic.startswith(ZIP_MAGIC) and zip_kind(path) == "damaged":  # torch said "[Errno 22] Invalid argument"
            first = "a zip archive, as torch.save writes, cut short or damaged: copy or save it again"
        elif magic.startswith(ZIP_MAGIC) and zip_kind(path) == "numpy":
            raise ConfigError(f"--init-from {path} is {ZIP_WORDS['numpy']}, not a state_dict; save the weights "
                              "with torch.save(model.state_dict(), PATH)") from None
        elif holds_objects(exc):  # torch's refusal of pickled objects beyond tensors
            raise ConfigError(f"--init-from {path} holds Python objects besides tensors (a whole model saved with "
                              "torch.save(model)?); save model.state_dict() instead") from None
        raise ConfigError(f"--init-from {path} is not a readable state_dict ({first})") from None
    if isinstance(state, dict) and state.get("format") == CHECKPOINT_FORMAT:
        raise ConfigError(f"--init-from {path} is an ssvi training checkpoint; --init-from takes a model file "
                          f"(ssvi export {quote_path(path)} -o model.safetensors) or a run directory (its model file, else its "
                          "newest checkpoint)")
    if isinstance(state, dict) and not all(isinstance(v, Tensor) for v in state.values()):
        # A training checkpoint: the network's state_dict under the key its convention gives it
        # (Lightning's state_dict, PyTorch's tutorial model_state_dict, torchvision's references' model).
        inner = next((state[k] for k in CHECKPOINT_KEYS if isinstance(state.get(k), dict) and state[k]
                      and all(isinstance(v, Tensor) for v in state[k].values())), None)
        if inner is None:
            keys = ", ".join(repr(k) for k in list(state)[:6]) + (", ..." if len(state) > 6 else "")
            raise ConfigError(f"--init-from {path} does not hold a state_dict (a mapping of names to tensors), "
                              f"nor one under {', '.join(CHECKPOINT_KEYS)}; its keys: {keys}")
        state = inner
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ConfigError(f"--init-from {path} does not hold a state_dict (a mapping of names to tensors)")
    if any(k.endswith(".mu") for k in state) and any(k.endswith((".index", ".idx")) for k in state):
        raise ConfigError(f"--init-from {path} is an ssvi model file (sparse layers); --init-from takes a trained "
                          "dense network's state_dict")
    while state:  # wrappers nest in either order: module._orig_mod. and _orig_mod.module. alike
        prefix = next((p for p in WRAPPER_PREFIXES if all(k.startswith(p) for k in state)), None)
        if prefix is None:
            break
        state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _inner_network(state: dict[str, Tensor], own: dict[str, Any], source: Path,
                   optional: tuple[str, ...] = ()) -> tuple[dict[str, Tensor], Optional[str]]:
    """A wrapper's state_dict (a LightningModule's, whose network is an attribute: ``model.conv1.weight``)
    as the network's, when all its keys (but the ``optional`` ones, the head) sit under one prefix, with
    a note of what is left out (a loss module's buffers, say); two such prefixes (a model and its EMA
    copy) are refused, naming them."""
    first = next(iter(own), None)
    if first is None or first in state:
        return state, None
    prefixes = sorted({k[:-len(first)] for k in state if k.endswith("." + first)})
    fits = [p for p in prefixes if all(p + k in state for k in own if not k.startswith(AUX_HEADS) and k not in optional)]
    whole = [p for p in fits if all(p + k in state for k in optional)]
    fits = whole if len(fits) > 1 and len(whole) == 1 else fits  # a model beside its backbone alone: the model
    if len(fits) > 1:
        raise ConfigError(f"--init-from {source} holds the network under {len(fits)} prefixes ("
                          + ", ".join(repr(p) for p in fits) + "): save the state_dict of the one to start from")
    if not fits:
        return state, None
    inner = {k[len(fits[0]):]: v for k, v in state.items() if k.startswith(fits[0])}
    rest = len(state) - len(inner)
    return inner, (f"the network's weights read under {fits[0]!r} (a wrapper's state_dict)"
                   + (f", {rest} other tensor{'s' if rest != 1 else ''} left out" if rest else ""))


def check_state_dict(model: nn.Module, state: dict[str, Tensor], source: Path | str,
                     skip: tuple[str, ...] = ()) -> None:
    """Keys and shapes of ``state`` against ``model``'s (but ``skip``); the first difference is named."""
    expected = {k: v for k, v in model.state_dict().items() if k not in skip}
    hint = "the weights are for another architecture, or do not fit this data's input size"
    missing = [k for k in expected if k not in state]
    if missing:  # how far off (a bare "lacks" read as a damaged file), and what the file holds instead
        counted = [k for k in expected if not k.endswith(STEP_COUNTER)]  # adapt_state fills those in
        others = [k for k in state if k not in expected and not k.endswith(STEP_COUNTER)]
        counts = f"{sum(k in missing for k in counted)} of the model's {len(counted)} tensors are missing" + (
            f", and the file holds {len(others)} the model does not have, such as {others[0]!r}" if others else "")
        raise ConfigError(f"--init-from {source} lacks {missing[0]!r} (shape {tuple(expected[missing[0]].shape)}) of the "
                          "model" + (f" ({counts})" if len(missing) > 1 or others else ""))
    for key, value in expected.items():
        if tuple(state[key].shape) != tuple(value.shape):
            raise ConfigError(f"--init-from {source}: {key!r} has shape {tuple(state[key].shape)}, the model "
                              f"needs {tuple(value.shape)} ({hint})")
    extra = [k for k in state if k not in expected]
    if extra:
        raise ConfigError(f"--init-from {source} holds {extra[0]!r}, which the model does not have")
    for key in expected:  # else the first loss is NaN, and its error would point at the σ and prior settings
        bad = int((~torch.isfinite(state[key])).sum()) if state[key].is_floating_point() else 0
        if bad:
            kinds = " or ".join(w for w, n in (("NaN", state[key].isnan()), ("infinite", state[key].isinf())) if n.any())
            raise ConfigError(f"--init-from {source}: {key!r} holds {kinds} values ({bad:,} of {state[key].numel():,}); "
                              "the run that saved it had diverged, or the file is damaged")


def base_for(cfg: Config, spec: DataSpec) -> nn.Module:
    """The deterministic torchvision model the state_dict must fit."""
    source = str(cfg.model.init_from)
    if not cfg.model.name.startswith(TORCHVISION):
        from ssvi_cli.training.init_posterior import what_else

        raise ConfigError(f"--init-from {source} is not a trained ssvi model (a run directory, a model file or a "
                          f"training checkpoint, which start any model) but {what_else(source)}, and "
                          f"deterministic weights start only a torchvision:NAME model, not {cfg.model.name!r}")
    return torchvision_base(cfg.model.name[len(TORCHVISION):], spec.input_shape, spec.num_classes)
