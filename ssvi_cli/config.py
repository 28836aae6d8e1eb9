"""Typed, frozen run configuration: YAML presets plus ``key.sub=value`` overrides.

One name per knob: the dataclass field, the YAML key and the override key are the same string.
This module does not import torch, so it stays cheap for ``ssvi presets`` and validation.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Optional, Union, get_args, get_origin, get_type_hints

from ssvi_cli.fileio import looked_in
from ssvi_cli.methods import METHODS, Method

ALLOCATIONS = ("uniform", "erk")
SIGMA_PARAMS = ("softplus", "exp")
NEW_SIGMA = ("mean", "tiny")
OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("cosine", "constant")
DEVICES = ("auto", "cpu", "cuda")
KERNELS = ("auto", "sparse", "dense")
PRECISIONS = ("fp32", "bf16", "fp16")
MU_INITS = ("fan_in", "dense_fan_in", "fixed")
# sparse.delta_t: a number of minibatches, or AUTO to fit the schedule to the run's length
# (core/subspace.py: resolve_delta_t); PAPER_DELTA_T is RigL's and the paper's, auto's upper bound.
DELTA_T_AUTO = "auto"
PAPER_DELTA_T = 100
MIN_SUBSPACE_STEPS = 100  # auto's default target (sparse.min_subspace_steps)
MAX_LR = 100.0
MAX_EPOCHS = 1_000_000  # beyond any run: 1e20 epochs hung the schedule's first subspace step
MAX_BATCH = 2**24  # 1e20 overflowed torch's index type
MAX_SAMPLES = 100_000  # Monte Carlo draws per input: 1e11 ran for ever
MAX_ITEMS = 2**31 - 1  # inputs of a set (evaluate --ood-max-items): 1e20 overflowed torch's sizes
MAX_THREADS = 4096  # torch threads (bench --threads): 1e20 overflowed torch.set_num_threads
MAX_SEED = 2**32 - 1  # numpy's seed range; the trainer's per-epoch seed, seed * 1_000_003 + epoch, fits int64
_ADDITION = re.compile(r"^(sample|mean|accumulate:([1-9]\d*))$")
IMAGEFOLDER = "imagefolder:"  # data.name of the user's own image folder, imagefolder:PATH


def image_folder(name: Any) -> Optional[str]:
    """The folder (as written) of ``data.name`` ``imagefolder:PATH``; None for any other data: the one
    test of the prefix, for every module that treats an image folder apart."""
    text = str(name)
    return text[len(IMAGEFOLDER):] if text.startswith(IMAGEFOLDER) else None


class ConfigError(ValueError):
    """A bad preset, override key or value; the message names the fix."""


@dataclass(frozen=True)
class ModelConfig:
    name: str = "mlp"
    widths: tuple[int, ...] = (256, 256)
    dense_stem: bool = True  # conv models keep the first conv dense; MLPs ignore it
    init_from: Optional[str] = None  # a trained ssvi model; torchvision:NAME models: a state_dict or published weights


@dataclass(frozen=True)
class DataConfig:
    name: str = "digits"  # a registered dataset, or imagefolder:PATH (a folder of class folders)
    data_dir: Optional[str] = None
    download: bool = False
    val_fraction: float = 0.1  # of the training split
    augment: bool = True
    max_train: Optional[int] = None
    max_test: Optional[int] = None  # the run's own final evaluation only (a smoke run); ssvi evaluate scores all
    # Image folders only: the test share of a folder without train/ and test/, the side images are
    # resized to, 1 (gray) or 3 (RGB) channels, and the normalisation (default: measured on the
    # training images, per channel).
    test_fraction: float = 0.2
    image_size: int = 32
    channels: int = 3
    mean: Optional[tuple[float, ...]] = None
    std: Optional[tuple[float, ...]] = None
    # Train on these classes only (default: all), by index or name, relabelled 0..k-1 in this order;
    # the others are held out (`ssvi evaluate --ood heldout`). Resolved against the dataset in data/.
    classes: Optional[tuple[str, ...]] = None


IMAGEFOLDER_KEYS = ("test_fraction", "image_size", "channels", "mean", "std")  # DataConfig's, for image folders only


@dataclass(frozen=True)
class SparseConfig:
    method: str = "ssvi"
    sparsity: float = 0.9
    allocation: str = "uniform"
    criterion: str = "snr_abs"
    criterion_lambda: float = 1.0
    addition: str = "sample"
    delta_t: Union[int, str] = PAPER_DELTA_T  # minibatches between subspace steps, or "auto"
    min_subspace_steps: int = MIN_SUBSPACE_STEPS  # delta_t=auto: at least this many subspace steps
    alpha: float = 0.3
    t_end: float = 0.75  # fraction of total optimisation steps from which the support is frozen
    new_sigma: str = "mean"


@dataclass(frozen=True)
class BayesConfig:
    beta: float = 0.01
    prior_sigma: float = 0.005
    sigma_param: str = "softplus"
    sigma_init_mean: float = 6e-4
    sigma_init_std: float = 5e-4
    mu_init_std: float = 0.01
    # fan_in: mu ~ N(0, mu_init_std^2) for layers followed by BatchNorm, a He init over the active
    # fan-in for the others; dense_fan_in: the same over the layer's whole fan-in (a dense layer's He
    # init, masked); fixed: N(0, mu_init_std^2) for every layer (the paper's recipe, METHOD.md section 5).
    mu_init: str = "fan_in"
    kl_warmup: bool = True


@dataclass(frozen=True)
class OptimConfig:
    name: str = "sgd"
    lr: float = 0.01
    lr_sigma: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 200
    batch_size: int = 128
    seed: int = 0
    device: str = "auto"
    eval_samples: int = 10
    kernel: str = "auto"
    precision: str = "fp32"
    checkpoint_every: int = 1
    keep_checkpoints: int = 2
    num_workers: int = 0


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sparse: SparseConfig = field(default_factory=SparseConfig)
    bayes: BayesConfig = field(default_factory=BayesConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(self)

    @property
    def method(self) -> Method:
        """The training method as an object (``bayesian``, ``dense``, ``moves_support``)."""
        return METHODS.get(self.sparse.method)

    @property
    def density(self) -> float:
        """Target density of sparse layers (1.0 for the dense methods)."""
        return self.method.density(self.sparse.sparsity)


def _to_plain(obj: Any) -> Any:
    if is_dataclass(obj):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, tuple):
        return [_to_plain(v) for v in obj]
    return obj


def addition_accumulate(addition: str) -> int:
    """Number of minibatches whose dense gradients are averaged (1 for sample/mean)."""
    m = _ADDITION.match(addition)
    if m is None:
        raise ConfigError(
            f"sparse.addition={addition!r}; valid values are sample, mean, accumulate:N (N ≥ 1)"
        )
    return int(m.group(2)) if m.group(2) else 1


_KINDS = {int: "an integer", float: "a number", str: "a word", bool: "true or false"}


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML/override value to the annotated field type, or raise ConfigError."""
    origin = get_origin(tp)
    if origin is Union:  # Optional[X], or X | Y tried in order (int | str: a number or a word)
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) < len(get_args(tp)) and (
                value is None or (isinstance(value, str) and value.lower() in ("null", "none"))):
            return None
        if len(args) == 1:
            return _coerce(value, args[0], key)
        for option in args:
            try:
                return _coerce(value, option, key)
            except ConfigError:
                pass
        kinds = " or ".join(_KINDS.get(a, str(a)) for a in args)
        raise ConfigError(f"{key} expects {kinds}, got {value!r}")
    if origin is tuple:
        (inner, _ellipsis) = get_args(tp)
        if isinstance(value, str):  # split on commas when there are any (a class name may hold spaces)
            body = value.strip("[]() ")
            if value.strip().startswith("(") and body.endswith(","):  # a one-item tuple, as Python writes it: (512,)
                body = body[:-1]
            items = [v.strip() for v in (body.split(",") if "," in body else body.split())]
            if "" in items:  # "512,,512", "0,1,": refused as sweep's comma lists refuse it
                raise ConfigError(f"{key}: {value!r} has an empty item; remove the extra comma")
            value = [_unquoted(v) for v in items]
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} expects a list, got {value!r}")
        return tuple(_coerce(v, inner, key) for v in value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):  # --set data.augment=1 reads as the integer 1
            return bool(value)
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "no", "0", "off"):
            return False
        raise ConfigError(f"{key} expects true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not (
            isinstance(value, int) or (isinstance(value, str) and re.fullmatch(r"-?\d+", value))
        ):
            raise ConfigError(f"{key} expects an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key} expects a number, got {value!r}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key} expects a number, got {value!r}") from None
        if not math.isfinite(number):
            raise ConfigError(f"{key} expects a finite number, got {value!r}")
        return number
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key} expects a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{key}: unsupported type {tp}")


@functools.lru_cache(maxsize=None)
def _section_types(cls: type) -> dict[str, Any]:
    """A config section's field types (cached: a large sweep builds thousands of configs; not to be
    changed by callers)."""
    return get_type_hints(cls)


def read_value(key: str, value: Any) -> Any:
    """``value`` as the config reads it for the settable ``key`` (``on`` -> True, ``"0.9"`` -> 0.9), or
    :class:`ConfigError`."""
    return _coerce(value, key_type(key), key)


def key_type(key: str) -> Any:
    """The type a settable ``section.key`` holds (``float``, ``Optional[int]``, ``tuple[int, ...]``)."""
    section, _, name = key.partition(".")
    return _section_types(_section_types(Config)[section])[name]


def valid_keys() -> list[str]:
    """Every settable ``section.key``."""
    return [
        f"{section}.{key}"
        for section, cls in _section_types(Config).items()
        for key in _section_types(cls)
    ]


def _did_you_mean(key: str, choices: Optional[list[str]] = None) -> str:
    """`` (did you mean 'optim.lr'?)``: the closest of ``choices`` (default: the config keys, where a
    key given without its section, ``lr``, finds the one section that has it)."""
    import difflib

    folded = [c for c in (valid_keys() if choices is None else choices) if c.lower() == key.lower() and c != key]
    if len(folded) == 1:  # OPTIM.LR: the key in its own case (difflib's ratio is case-sensitive)
        return f" (did you mean {folded[0]!r}?)"
    if choices is None:  # a key without its section, or under another section: the one that has it
        choices = valid_keys()
        owners = [k for k in choices if k.split(".", 1)[1] == key.rpartition(".")[2]]
        if len(owners) == 1 and owners[0] != key:
            return f" (did you mean {owners[0]!r}?)"
        words = sorted(key.rpartition(".")[2].split("_"))  # its words in another order: sigma_prior
        swapped = [k for k in choices if sorted(k.split(".", 1)[1].split("_")) == words and k != key]
        if len(swapped) == 1:
            return f" (did you mean {swapped[0]!r}?)"
    else:  # a longer or shorter name of a section ("optimizer" for "optim")
        prefixed = [c for c in choices if min(len(c), len(key)) >= 4 and (c.startswith(key) or key.startswith(c))]
        if len(prefixed) == 1:
            return f" (did you mean {prefixed[0]!r}?)"
    close = difflib.get_close_matches(key, choices, n=1, cutoff=0.75)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _preset_hint(name: str, presets: list[str]) -> str:
    """`` (did you mean 'digits_mlp'?)`` for the presets whose name ``name`` begins (``digit``, ``mnist``:
    one of them, or each), or the closest name."""
    starting = ([p for p in presets if p.startswith(f"{name}_")] or [p for p in presets if p.startswith(name)]
                if len(name) >= 3 else [])
    if starting:
        return f" (did you mean {' or '.join(repr(p) for p in starting)}?)"
    return _did_you_mean(name, presets)


def apply_overrides(cfg: Config, overrides: dict[str, Any]) -> Config:
    """Return a new Config with ``{"section.key": value}`` applied; unknown keys are rejected."""
    sections = {f.name: getattr(cfg, f.name) for f in fields(Config)}
    for key, value in overrides.items():
        parts = key.split(".")
        if len(parts) != 2 or parts[0] not in sections:
            raise ConfigError(f"unknown config key {key!r}" + (
                f"{hint}; 'ssvi presets NAME' lists every key" if (hint := _did_you_mean(key)) else
                f"; valid keys are: {', '.join(valid_keys())}"))
        section, name = parts
        types = _section_types(type(sections[section]))
        if name not in types:
            raise ConfigError(f"unknown config key {key!r}" + (
                f"{hint}; 'ssvi presets NAME' lists every key" if (hint := _did_you_mean(key)) else
                f"; valid keys in {section!r} are: " + ", ".join(f"{section}.{k}" for k in types)))
        sections[section] = replace(sections[section], **{name: _coerce(value, types[name], key)})
    new = Config(**sections)
    validate(new)
    return new


def _flatten(data: Any, where: str = "config", skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """``{section: {key: value}}`` as ``{"section.key": value}``, leaving out the ``skip`` sections."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping of sections")
    flat: dict[str, Any] = {}
    known = [f.name for f in fields(Config)]
    for section, values in data.items():
        if section in skip:
            continue
        if section not in known:
            sec, dot, name = str(section).partition(".")
            if dot and f"{sec}.{name}" in valid_keys():  # "train.epochs: 3", as --set writes it
                raise ConfigError(f"{where}: unknown section {section!r}; a file writes the key under its section: "
                                  f"{sec}: {{{name}: {values!r}}}")
            key = _did_you_mean(str(section)) if not isinstance(values, dict) else ""  # "lr: 0.01", a key alone
            raise ConfigError(f"{where}: unknown section {section!r}" + (
                f"{key[:-2]}, written under its section?)" if key else _did_you_mean(str(section), known))
                + f"; valid sections are: {', '.join(known)}")
        if not isinstance(values, dict):
            raise ConfigError(f"{where}: section {section!r} must be a mapping, got {values!r}")
        for k, v in values.items():
            flat[f"{section}.{k}"] = v
    return flat


def flat_dict(cfg: Config) -> dict[str, Any]:
    """The config as ``{"section.key": value}``, the keys ``--set`` names."""
    return _flatten(cfg.to_dict())


def from_dict(data: dict[str, Any]) -> Config:
    """Build a validated Config from a nested mapping such as a saved config."""
    return apply_overrides(Config(), _flatten(data, skip=("command",)))


def _method_values(data: dict[str, Any], base: Config) -> dict[str, dict[str, Any]]:
    """A preset's ``methods: {NAME: {section: {key: value}}}``, flattened per method; every entry is
    checked against ``base`` (the shared values), whichever method is about to run."""
    per_method = data.get("methods", {})
    if per_method is None:  # "methods:" with nothing under it
        return {}
    if not isinstance(per_method, dict):
        raise ConfigError(f"'methods' must map method names to sections, got {per_method!r}")
    out: dict[str, dict[str, Any]] = {}
    for name, sections in per_method.items():
        if name not in METHODS:
            raise ConfigError(f"methods: {METHODS.unknown_message(name)}")
        own = _flatten(sections, f"methods.{name}")
        if "sparse.method" in own:
            raise ConfigError(f"methods.{name} cannot set sparse.method")
        try:
            apply_overrides(base, own)
        except ConfigError as exc:
            raise ConfigError(f"methods.{name}: {exc}") from None
        out[name] = own
    return out


def _unquoted(item: str) -> str:
    """An item of a comma-separated list without the YAML quotes around it (``'0'`` is ``0``)."""
    return item[1:-1] if len(item) >= 2 and item[0] == item[-1] and item[0] in "'\"" else item


_UNREAD = object()


def parse_override(text: str) -> tuple[str, Any]:
    """Parse ``key.sub=value``; the value is read as YAML scalar/list (never evaluated as code)."""
    if "=" not in text:
        raise ConfigError(f"--set expects key.sub=value, got {text!r}")
    key, raw = text.split("=", 1)
    try:
        value = read_typed(raw) if raw.strip() else ""
    except ValueError as exc:
        if raw.count("[") > raw.count("]") or raw.count("{") > raw.count("}"):  # a list cut short: [10,20
            raise ConfigError(f"--set {text}: the value is not valid YAML ({str(exc).splitlines()[0]}); "
                              "close its brackets") from None
        value = raw
    if isinstance(value, dict):  # no key takes a mapping: `accumulate:` or `imagefolder:` is the text typed
        value = raw.strip()
    return key.strip(), as_typed_path(key.strip(), raw, value)


def as_typed_path(key: str, raw: str, value: Any = _UNREAD) -> Any:
    """A path key's value ``raw`` as typed, where YAML reads it as text (``value``, read from ``raw``
    if not given) and it is not quoted: YAML would end ``photos #1`` at its comment, ``#1``; other keys,
    or ``null``, as YAML reads them."""
    if value is _UNREAD:
        try:
            value = read_typed(raw)
        except ValueError:
            value = raw.strip()
    if key in PATH_KEYS and isinstance(value, str) and raw.strip()[:1] not in ("'", '"'):
        return raw.strip()
    return value


_INT_TAG, _FLOAT_TAG = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"
_strict_loader: Any = None
_typed_loader: Any = None


def yaml_problem(exc: Exception) -> tuple[str, str]:
    """Where the YAML parser stopped (``" at line L, column C"``, or ``""``) and what it found wrong:
    its problem ("found character '\\t' that cannot start any token"), then what it was doing."""
    mark = getattr(exc, "problem_mark", None)
    at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    problem, context = getattr(exc, "problem", None), getattr(exc, "context", None)
    what = f"{problem} ({context})" if problem and context else problem or context or str(exc).strip().splitlines()[0]
    return at, what


def read_yaml(text: str) -> Any:
    """A preset or sweep file's text as YAML, its numbers read as :func:`read_typed` reads them (``010``
    is ten, as on a command line), and a key given twice in one mapping an error (``yaml.YAMLError``,
    with the line): PyYAML alone keeps the last one silently, so a file that sets a key twice would
    run with one of the two unsaid."""
    global _strict_loader
    import yaml

    if _strict_loader is None:
        class Loader(_typed_loader_class()):  # type: ignore[misc]
            def construct_mapping(self, node: Any, deep: bool = False) -> Any:
                seen: set[str] = set()
                for key_node, _ in node.value if isinstance(node, yaml.MappingNode) else ():
                    if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                        if key_node.value in seen:
                            raise yaml.constructor.ConstructorError(
                                None, None, f"the key {key_node.value!r} is given twice", key_node.start_mark)
                        seen.add(key_node.value)
                return super().construct_mapping(node, deep=deep)

        _strict_loader = Loader
    return _within_bounds(yaml.load(text, Loader=_strict_loader))  # noqa: S506 (a SafeLoader)


YAML_VALUES_MAX = 100_000  # a config or sweep file holds hundreds; a few hundred bytes of aliases, billions


def _within_bounds(data: Any) -> Any:
    """``data`` as read, refused (``yaml.YAMLError``) when its aliases make it larger than
    :data:`YAML_VALUES_MAX` values once expanded (a 300-byte file of nested ``*a`` expands to
    billions, and a message quoting it took gigabytes) or make it contain itself."""
    import yaml

    seen, stack = 0, [(data, ())]
    while stack:
        value, above = stack.pop()
        seen += 1
        if seen > YAML_VALUES_MAX:
            raise yaml.YAMLError(f"the file's aliases (*name) expand it past {YAML_VALUES_MAX:,} values; write "
                                 "the values out")
        if isinstance(value, (list, tuple, dict)):  # tuples: !!omap and !!pairs
            if id(value) in above:
                raise yaml.YAMLError("the file's aliases (*name) make a value contain itself")
            inner = above + (id(value),)
            stack.extend((v, inner) for v in (value.values() if isinstance(value, dict) else value))
    return data


def read_typed(text: str) -> Any:
    """``text`` as YAML, with every number the one typed on a command line (``--set`` of ``ssvi train``
    and ``ssvi sweep`` alike, and the files :func:`read_yaml` reads): an integer is decimal (YAML 1.1
    reads 010 as octal 8, 0x10 as 16 and 1:30 as 90; those stay the text, which no number key takes)
    and ``1e-3`` is a float (YAML 1.1 wants a dot). Raises ValueError on text that is not YAML."""
    import yaml  # here, not at the top: commands that never read YAML (infer) skip its import

    try:
        return _within_bounds(yaml.load(text, Loader=_typed_loader_class()))  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as exc:
        raise ValueError(str(exc)) from None


def _typed_loader_class() -> Any:
    """A SafeLoader whose implicit numbers are :func:`read_typed`'s."""
    global _typed_loader
    import yaml

    if _typed_loader is None:
        class Loader(yaml.SafeLoader):
            pass

        Loader.yaml_implicit_resolvers = {
            first: [(tag, rx) for tag, rx in resolvers if tag not in (_INT_TAG, _FLOAT_TAG)]
            for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
        Loader.add_implicit_resolver(_INT_TAG, re.compile(r"^[-+]?[0-9]+$"), list("-+0123456789"))
        Loader.add_implicit_resolver(_FLOAT_TAG, re.compile(
            r"^[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?$|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"),
            list("-+0123456789."))
        Loader.add_constructor(_INT_TAG, lambda loader, node: int(loader.construct_scalar(node), 10))
        _typed_loader = Loader
    return _typed_loader


def as_typed(value: Any) -> str:
    """A config value in a message as a user writes it: a list as YAML's ``[0, 0, 1]`` (not a tuple)."""
    return f"[{', '.join(map(str, value))}]" if isinstance(value, (tuple, list)) else repr(value)


def validate(cfg: Config) -> None:
    """Range and choice checks that need no registry (names are checked by the registries)."""
    s, b, o, t, d = cfg.sparse, cfg.bayes, cfg.optim, cfg.train, cfg.data

    def choice(key: str, value: str, options: tuple[str, ...]) -> None:
        if value not in options:
            raise ConfigError(f"{key}={value!r}; valid values are: {', '.join(options)}")

    flat = flat_dict(cfg)
    for key in PATH_KEYS:  # recorded in the run's config.yaml and model file, which are UTF-8 text
        value = flat.get(key)
        try:
            value.encode("utf-8") if isinstance(value, str) else None
        except UnicodeEncodeError:
            raise ConfigError(f"{key}={value.encode('utf-8', 'backslashreplace').decode()}: the path is not UTF-8 "
                              "text, which the run's config and model file record; rename it") from None
    choice("sparse.method", s.method, tuple(METHODS.names()))
    choice("sparse.allocation", s.allocation, ALLOCATIONS)
    choice("sparse.new_sigma", s.new_sigma, NEW_SIGMA)
    choice("bayes.sigma_param", b.sigma_param, SIGMA_PARAMS)
    choice("bayes.mu_init", b.mu_init, MU_INITS)
    choice("optim.name", o.name, OPTIMIZERS)
    choice("optim.schedule", o.schedule, SCHEDULES)
    if t.device.startswith("cuda:"):
        raise ConfigError(f"train.device={t.device!r}; valid values are: {', '.join(DEVICES)} (pick the GPU with "
                          f"CUDA_VISIBLE_DEVICES={t.device.partition(':')[2]} and --device cuda)")
    choice("train.device", t.device, DEVICES)
    choice("train.kernel", t.kernel, KERNELS)
    choice("train.precision", t.precision, PRECISIONS)
    n_acc = addition_accumulate(s.addition)
    auto_dt = s.delta_t == DELTA_T_AUTO
    max_dt = PAPER_DELTA_T if auto_dt or not isinstance(s.delta_t, int) else s.delta_t
    if not 0.0 <= s.sparsity < 1.0:
        raise ConfigError(f"sparse.sparsity={s.sparsity} must be in [0, 1), e.g. --sparsity 0.95")
    folder = image_folder(d.name) is not None
    checks = [
        ("sparse.alpha", 0.0 <= s.alpha <= 1.0, "in [0, 1]"),
        ("sparse.t_end", 0.0 <= s.t_end <= 1.0, "in [0, 1]"),
        ("sparse.delta_t", auto_dt or (isinstance(s.delta_t, int) and s.delta_t >= 2),
         f"an integer >= 2 (the paper's is {PAPER_DELTA_T}) or {DELTA_T_AUTO}"),
        ("sparse.addition", n_acc < max_dt, f"accumulate:N with N < delta_t={s.delta_t}" if not auto_dt else
         f"accumulate:N with N < delta_t, which {DELTA_T_AUTO} makes at most {PAPER_DELTA_T}"),
        ("sparse.min_subspace_steps", s.min_subspace_steps >= 1, ">= 1"),
        ("sparse.criterion_lambda", s.criterion_lambda > 0, "> 0"),
        ("bayes.beta", b.beta >= 0, ">= 0"),
        ("bayes.prior_sigma", b.prior_sigma > 0, "> 0"),
        ("bayes.sigma_init_mean", b.sigma_init_mean > 0, "> 0"),
        ("bayes.sigma_init_std", b.sigma_init_std >= 0, ">= 0"),
        ("bayes.mu_init_std", b.mu_init_std > 0, "> 0"),
        # Learning rates far beyond any sensible one overflow float32 inside the optimizer.
        ("optim.lr", 0 < o.lr <= MAX_LR, f"> 0 and at most {MAX_LR:g}"),
        ("optim.lr_sigma", 0 <= o.lr_sigma <= MAX_LR, f">= 0 and at most {MAX_LR:g}"),
        ("optim.momentum", 0 <= o.momentum < 1, "in [0, 1)"),
        ("optim.weight_decay", o.weight_decay >= 0, ">= 0"),
        ("train.epochs", 1 <= t.epochs <= MAX_EPOCHS, f"in [1, {MAX_EPOCHS:,}]"),
        ("train.batch_size", 1 <= t.batch_size <= MAX_BATCH, f"in [1, {MAX_BATCH:,}]"),
        ("train.eval_samples", 1 <= t.eval_samples <= MAX_SAMPLES, f"in [1, {MAX_SAMPLES:,}]"),
        ("train.checkpoint_every", t.checkpoint_every >= 1, ">= 1"),
        ("train.keep_checkpoints", t.keep_checkpoints >= 1, ">= 1"),
        ("train.num_workers", t.num_workers >= 0, ">= 0"),
        ("train.seed", 0 <= t.seed <= MAX_SEED, f"in [0, {MAX_SEED}]"),
        ("data.val_fraction", 0.0 <= d.val_fraction < 1.0, "in [0, 1)"),
        ("data.max_train", d.max_train is None or d.max_train >= 1, ">= 1"),
        ("data.max_test", d.max_test is None or d.max_test >= 1, ">= 1"),
        # The image folder keys: set for another dataset, the data layer refuses them by name instead.
        ("data.test_fraction", not folder or 0.0 < d.test_fraction < 1.0, "in (0, 1)"),
        ("data.image_size", not folder or d.image_size >= 1, ">= 1"),
        ("data.channels", not folder or d.channels in (1, 3), "1 or 3"),
        ("data.mean", not folder or d.mean is None or len(d.mean) == d.channels, f"{d.channels} numbers, one per channel"),
        ("data.std", not folder or d.std is None or (len(d.std) == d.channels and min(d.std) > 0),
         f"{d.channels} positive numbers, one per channel"),
        ("data.classes", d.classes is None or len(set(d.classes)) == len(d.classes),
         "a list naming each class once (" + ", ".join(sorted({c for c in d.classes or () if d.classes.count(c) > 1}))
         + " twice)"),
        ("data.classes", d.classes is None or len(d.classes) >= 2,
         "at least two classes, by index or name (e.g. 0,1,2,3,4)"),
        ("model.widths", all(w >= 1 for w in cfg.model.widths), "positive integers"),
    ]
    for key, ok, rule in checks:
        if not ok:
            section, name = key.split(".")
            value = getattr(getattr(cfg, section), name)
            raise ConfigError(f"{key}={as_typed(value)} must be {rule}")


# ---------------------------------------------------------------- presets

def presets_dir() -> Path:
    """The presets: ``ssvi_cli/presets`` in an installed wheel (pyproject.toml ships them there), else
    the source tree's ``presets/`` beside the package (a checkout, an editable install)."""
    here = Path(__file__).resolve().parent
    return next((d for d in (here / "presets", here.parent / "presets") if d.is_dir()), here.parent / "presets")


PRESET_SUFFIXES = (".yaml", ".yml", ".json")  # a preset file's (--print-config --json writes the JSON one)


def list_presets() -> dict[str, Path]:
    d = presets_dir()
    return {p.stem: p for p in sorted(d.glob("*.yaml"))} if d.is_dir() else {}


def preset_command(path: Path) -> str:
    """The command line a preset records on its first line (``# ssvi train ...``); for a file
    without one, the command that runs it by name."""
    first = path.read_text(encoding="utf-8").splitlines()[0] if path.stat().st_size else ""
    return first.lstrip("# ").strip() if first.startswith("#") else f"ssvi train --preset {path.stem}"


def _read_preset(name_or_path: str) -> tuple[Path, dict[str, Any]]:
    presets = list_presets()
    path = presets.get(name_or_path)
    if path is None:
        candidate = Path(name_or_path).expanduser()
        if candidate.suffix.lower() in PRESET_SUFFIXES and candidate.is_file():
            path = candidate
        elif candidate.suffix.lower() in PRESET_SUFFIXES:
            shipped = candidate.stem if candidate.stem in presets and len(candidate.parts) == 1 else None
            raise ConfigError(f"preset file {name_or_path} " + ("is a folder" if candidate.is_dir() else
                                                                 f"does not exist{looked_in(candidate)}")
                              + (f"; the shipped preset is named without its suffix: {shipped}" if shipped else
                                 "; give a YAML (or JSON) file's path"))
        elif candidate.is_file() and candidate.suffix.lower() in (".safetensors", ".pt", ".pth"):  # weights, not a recipe
            raise ConfigError(f"preset file {name_or_path} holds weights, not a config: --init-from {name_or_path} starts "
                              "from them (a run's recipe is its config.yaml: --preset RUN/config.yaml)")
        elif candidate.is_file():  # a preset's file is told from a preset's name by its suffix
            raise ConfigError(f"preset file {name_or_path}: a preset file's name ends in "
                              f"{', '.join(PRESET_SUFFIXES[:-1])} or {PRESET_SUFFIXES[-1]}; rename it")
        elif candidate.is_dir() and (candidate / "config.yaml").is_file():  # a run's folder: its recipe is in it
            raise ConfigError(f"--preset {name_or_path} is a run's folder; its config is --preset {candidate / 'config.yaml'}")
        else:
            file = next((f"{candidate}{s}" for s in PRESET_SUFFIXES if Path(f"{candidate}{s}").is_file()), None)
            raise ConfigError(
                f"unknown preset {name_or_path!r}{_preset_hint(str(name_or_path), list(presets))}; "
                + (f"to train from the file {file}, give its name with the suffix: --preset {file}" if file else
                   f"valid names are: {', '.join(presets) or '(none)'} (or pass a path to a .yaml or .json file)")
            )
    import yaml

    try:
        text = path.read_text(encoding="utf-8")
        data = _read_json(path, text) if path.suffix.lower() == ".json" else read_yaml(text)
    except yaml.YAMLError as exc:
        at, what = yaml_problem(exc)
        raise ConfigError(f"preset {path} is not valid YAML{at}: {what}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"preset {path} is not UTF-8 text; save it as UTF-8") from None
    except OSError as exc:
        raise ConfigError(f"preset {path} cannot be read ({exc}); check the path and its permissions") from None
    if data is None:
        raise ConfigError(f"preset {path} is empty; start from a shipped preset (see 'ssvi presets')")
    return path, data


def _read_json(path: Path, text: str) -> Any:
    """A ``.json`` preset read as JSON, not as YAML (which took a trailing comma, and called a key given
    twice "not valid YAML"); a key given twice is refused, as in a YAML preset."""
    import json

    def once(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [k for k, _ in pairs]
        if twice := next((k for i, k in enumerate(keys) if k in keys[:i]), None):
            raise ConfigError(f"preset {path} gives {twice!r} twice in one object; give it once")
        return dict(pairs)

    try:
        return json.loads(text, object_pairs_hook=once) if text.strip() else None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"preset {path} is not valid JSON (line {exc.lineno}, column {exc.colno}): {exc.msg}") from None


def preset_methods(name_or_path: str) -> tuple[Config, dict[str, dict[str, Any]]]:
    """A preset's shared values, and what its ``methods:`` section gives each method instead
    (``{"vi": {"optim.lr": 0.003}}``)."""
    path, data = _read_preset(name_or_path)
    try:
        base = apply_overrides(Config(), _flatten(data, skip=("command", "methods")))
        return base, _method_values(data, base)
    except ConfigError as exc:
        raise ConfigError(f"preset {name_or_path}: {exc}") from None  # as the user named it


def load_preset(name_or_path: str, method: Optional[str] = None) -> Config:
    """Load a preset by name (``digits_mlp``) or by path to a YAML file, for ``method`` (default: its
    own ``sparse.method``): a preset may give a method its own values in a ``methods:`` section, for
    a knob such as the learning rate whose best value differs between sparse and dense methods."""
    if method is not None and method not in METHODS:
        apply_overrides(Config(), {"sparse.method": method})  # refuses it, as a --set would
    base, per_method = preset_methods(name_or_path)
    chosen = method or base.sparse.method
    return apply_overrides(base, {**per_method.get(chosen, {}), "sparse.method": chosen})


def from_preset(name_or_path: str, overrides: dict[str, Any]) -> Config:
    """A preset with ``{"section.key": value}`` overrides on top, as ``ssvi train`` builds a run: the
    preset's values for the method the overrides choose (``sparse.method``), then the overrides;
    the paths it names made absolute (:func:`absolute_path`)."""
    method = overrides.get("sparse.method")
    chosen = method if isinstance(method, str) and method in METHODS else None  # else refused below
    return with_absolute_paths(apply_overrides(load_preset(name_or_path, chosen), overrides))


def check_imagefolder_keys(cfg: Config, given: Any = ()) -> None:
    """Refuse the image folder keys (:data:`IMAGEFOLDER_KEYS`) for a dataset that is not an image
    folder, which has its own shape and normalisation and would ignore them: each one off its default,
    and each one in ``given`` (the ``"section.key"`` names the command line set) at any value."""
    if image_folder(cfg.data.name) is not None:
        return
    for key in IMAGEFOLDER_KEYS:
        value = getattr(cfg.data, key)
        if f"data.{key}" in given or value != getattr(DataConfig, key):
            raise ConfigError(f"data.{key}={as_typed(value)} applies to image folders (data.name=imagefolder:PATH) "
                              f"only; {cfg.data.name} has its own input shape and normalisation")


def with_absolute_paths(cfg: Config) -> Config:
    """``cfg`` with every path it names absolute (:func:`absolute_path`)."""
    flat = flat_dict(cfg)
    moved = {k: absolute_path(k, flat[k]) for k in PATH_KEYS}
    return apply_overrides(cfg, {k: v for k, v in moved.items() if v != flat[k]})


# The keys that name a file or folder: recorded absolute, so that a run resumed or evaluated, or a
# sweep's cell run by a scheduler, from another directory finds them.
PATH_KEYS = ("data.name", "data.data_dir", "model.init_from")


def absolute_path(key: str, value: Any) -> Any:
    """``value`` of ``key`` with the path it names absolute (``~`` expanded, links resolved):
    ``imagefolder:PATH``, ``data.data_dir`` and a file ``model.init_from`` names; a dataset's name,
    ``torchvision:WEIGHTS`` and anything else as it is."""
    if not isinstance(value, (str, Path)) or key not in PATH_KEYS or not str(value):
        return value
    text = str(value)
    if key == "data.name":
        path = image_folder(text)
        return f"{IMAGEFOLDER}{Path(path).expanduser().resolve()}" if path else value
    if key == "model.init_from" and text.startswith("torchvision:"):
        return value
    return str(Path(text).expanduser().resolve())


def dump_yaml(cfg: Config) -> str:
    import yaml

    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


DEFAULT_PRESET = "digits_mlp"

__all__ = [
    "Config", "ConfigError", "key_type", "ModelConfig", "DataConfig", "SparseConfig", "BayesConfig",
    "OptimConfig", "TrainConfig", "apply_overrides", "flat_dict", "from_dict", "parse_override", "validate",
    "load_preset", "from_preset", "absolute_path", "with_absolute_paths", "PATH_KEYS", "preset_methods", "list_presets", "preset_command", "dump_yaml", "addition_accumulate",
    "DEFAULT_PRESET",
]
