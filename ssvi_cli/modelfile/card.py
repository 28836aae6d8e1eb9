"""The model card: what a model is (architecture), what it reads (data spec), how it was trained and
how it scored, as one typed object that travels between the trainer, checkpoints and the model file.

:func:`build_model` is the only place a model is rebuilt from a description; the file reader, the
checkpoint loader and the trainer all go through it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Optional

from ssvi_cli.config import SIGMA_PARAMS, Config, from_dict
from ssvi_cli.data.spec import DataSpec
from ssvi_cli.fileio import compact_json
from ssvi_cli.models import TORCHVISION, LayerFactory, SSVIModel, build_architecture

NO_DATASET = "unspecified"  # the dataset of a file saved by ssvi.save without dataset=

# The metadata keys the card occupies in a model file (each a JSON string).
CARD_KEYS = ("architecture", "data_spec", "training", "metrics")


class CardError(ValueError):
    """Metadata that does not describe a model (missing or malformed fields)."""


@dataclass(frozen=True)
class Architecture:
    """The model registry name and the arguments its builder takes."""

    name: str
    widths: tuple[int, ...] = (256, 256)
    bayesian: bool = True
    sigma_param: str = "softplus"
    # A torchvision model's nn.MultiheadAttention split into four projection layers (core.attention), as
    # sparsify splits it; a file from before records no "attention" and kept it whole.
    split_attention: bool = True

    def to_dict(self) -> dict[str, Any]:
        split = self.split_attention and self.name.startswith(TORCHVISION)
        return {"name": self.name, "widths": list(self.widths), "bayesian": self.bayesian,
                "sigma_param": self.sigma_param, **({"attention": "split"} if split else {})}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Architecture":
        try:
            name = str(d["name"])
            arch = cls(name=name, widths=tuple(int(w) for w in d.get("widths", (256, 256))),
                       bayesian=bool(d["bayesian"]), sigma_param=str(d.get("sigma_param", "softplus")),
                       split_attention=d.get("attention") == "split" or not name.startswith(TORCHVISION))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise CardError(f"architecture {dict(d) if isinstance(d, Mapping) else d!r} is malformed ({exc})") from None
        if any(w < 1 for w in arch.widths):
            raise CardError(f"architecture has a layer width below 1 ({list(arch.widths)})")
        if arch.sigma_param not in SIGMA_PARAMS:
            raise CardError(f"architecture has an unknown sigma parameterisation {arch.sigma_param!r}")
        return arch


def _n(value: Any) -> str:
    """A count as tables print it (``100,000``); anything else as it is."""
    return f"{value:,}" if isinstance(value, int) else str(value)


@dataclass(frozen=True)
class Training:
    """How the model was trained; ``config`` is the full resolved run config (a plain mapping)."""

    method: Optional[str] = None
    sparsity: Optional[float] = None
    criterion: Optional[str] = None
    epochs: Optional[int] = None
    seed: Optional[int] = None
    config: Optional[dict[str, Any]] = None
    # A model taken from a checkpoint before its run's last epoch: {"epoch": epochs done, "step": steps}.
    unfinished: Optional[dict[str, int]] = None

    def to_dict(self) -> dict[str, Any]:
        d = {"method": self.method, "sparsity": self.sparsity, "criterion": self.criterion,
             "epochs": self.epochs, "seed": self.seed, "config": self.config}
        return d if self.unfinished is None else {**d, "unfinished": dict(self.unfinished)}

    def unfinished_note(self) -> Optional[str]:
        """What a model taken before its run's end is, in words (None for a finished one)."""
        if self.unfinished is None:
            return None
        done = self.unfinished.get("epoch")
        step = self.unfinished.get("step")
        return (f"taken from a checkpoint after {_n(done)} of {_n(self.epochs)} epochs (step {_n(step)}): "
                "its training had not finished")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Training":
        if not isinstance(d, Mapping):
            raise CardError(f"training record {d!r} is not a mapping")
        config = d.get("config")
        unfinished = d.get("unfinished")
        return cls(method=d.get("method"), sparsity=d.get("sparsity"), criterion=d.get("criterion"),
                   epochs=d.get("epochs"), seed=d.get("seed"),
                   config=dict(config) if isinstance(config, Mapping) else None,
                   unfinished=dict(unfinished) if isinstance(unfinished, Mapping) else None)

    @classmethod
    def from_config(cls, cfg: Config) -> "Training":
        """A dense method's sparsity is 0 and a method that never ranks by a criterion has none,
        whatever the preset's ``sparse`` section says (the full config keeps it)."""
        method = cfg.method
        return cls(method=cfg.sparse.method, sparsity=0.0 if method.dense else cfg.sparse.sparsity,
                   criterion=None if method.ignores("sparse.criterion") else cfg.sparse.criterion,
                   epochs=cfg.train.epochs, seed=cfg.train.seed, config=cfg.to_dict())

    def run_config(self) -> Optional[Config]:
        """The recorded run config as a validated :class:`Config` (None when not recorded or not
        valid for this version)."""
        if self.config is None:
            return None
        try:
            return from_dict(self.config)
        except ValueError:
            return None


@dataclass(frozen=True)
class ModelCard:
    """Architecture, data spec, training record and final metrics of one model."""

    architecture: Architecture
    data: DataSpec
    training: Training = field(default_factory=Training)
    metrics: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_config(cls, cfg: Config, spec: DataSpec, metrics: Optional[dict[str, Any]] = None) -> "ModelCard":
        widths = () if cfg.model.name.startswith("torchvision:") else tuple(cfg.model.widths)  # the builder's own
        arch = Architecture(cfg.model.name, widths, cfg.method.bayesian, cfg.bayes.sigma_param)
        return cls(arch, spec, Training.from_config(cfg), dict(metrics or {}))

    def with_metrics(self, metrics: dict[str, Any]) -> "ModelCard":
        return ModelCard(self.architecture, self.data, self.training, dict(metrics))

    def to_metadata(self) -> dict[str, str]:
        """The card's part of a model file's metadata: one JSON string per key of :data:`CARD_KEYS`."""
        parts = {"architecture": self.architecture.to_dict(), "data_spec": self.data.to_dict(),
                 "training": self.training.to_dict(), "metrics": self.metrics}
        return {key: compact_json(value) for key, value in parts.items()}

    @classmethod
    def from_metadata(cls, decoded: Mapping[str, Any]) -> "ModelCard":
        """From metadata whose :data:`CARD_KEYS` are already JSON-decoded; raises :class:`CardError`."""
        from ssvi_cli.data.spec import DataError

        try:
            spec = DataSpec.from_dict(decoded["data_spec"])
        except DataError as exc:
            raise CardError(f"data description: {exc}") from None
        except (KeyError, TypeError, ValueError, AttributeError):
            raise CardError("data description malformed") from None
        arch = decoded.get("architecture")
        if not isinstance(arch, Mapping):
            raise CardError("architecture malformed")
        metrics = decoded.get("metrics") or {}
        return cls(Architecture.from_dict(arch), spec, Training.from_dict(decoded.get("training") or {}),
                   dict(metrics) if isinstance(metrics, Mapping) else {})

    def describe(self) -> dict[str, Any]:
        """A short summary for reports: architecture, method, sparsity, training data."""
        t = self.training
        return {"architecture": self.architecture.name, "bayesian": self.architecture.bayesian,
                "method": t.method, "sparsity": t.sparsity, "criterion": t.criterion, "epochs": t.epochs,
                "training_seed": t.seed, "trained_on": self.data.name,
                # data.classes: the part of the dataset's classes it was trained on (else None: all of them)
                "trained_classes": list(self.data.class_names) if self.data.dataset_classes else None,
                "dataset_classes": list(self.data.dataset_classes) or None}  # as the file and inspect name them


def with_attention_of(card: ModelCard, state: Any) -> ModelCard:
    """The card of the model whose state dict is ``state``: a torchvision run checkpointed before ssvi
    split nn.MultiheadAttention holds its ``in_proj_weight``, and is rebuilt with the attention whole."""
    if isinstance(state, Mapping) and any(str(key).endswith(".in_proj_weight") for key in state):
        return replace(card, architecture=replace(card.architecture, split_attention=False))
    return card


def build_model(card: ModelCard, kernel: str = "auto") -> SSVIModel:
    """The card's architecture with empty supports, every layer on kernel policy ``kernel``.

    Supports and values come from a file, a checkpoint or ``core.allocation.initialise``. Raises the
    model registry's ``UnknownName`` for an architecture this version does not know and
    ``ValueError`` for an impossible architecture/input pairing.
    """
    arch = card.architecture
    layers = LayerFactory(bayesian=arch.bayesian, sigma_param=arch.sigma_param, kernel=kernel,
                          split_attention=arch.split_attention)
    return build_architecture(arch.name, card.data.input_shape, card.data.num_classes, layers, arch.widths)
