"""What ``ssvi bench`` runs: the bench models (a preset's recipe plus defaults that fit 2 CPU cores),
``torchvision:NAME`` models, a run's options, and the synthetic data and configs every variant shares."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Optional

import torch
from torch.utils.data import TensorDataset

from ssvi_cli.config import Config, ConfigError, from_preset, load_preset
from ssvi_cli.data.spec import DataSpec, DataSplits
from ssvi_cli.models import (SMALL_INPUT_HINT, TORCHVISION, LayerFactory, build_architecture, check_model_name,
                             input_error, torchvision_base)
from ssvi_cli.registry import Registry, UnknownName

KERNELS = ("sparse", "dense", "auto")
NUM_CLASSES = 10
SYNTHETIC_NOTE = "synthetic random inputs and labels of the model's input shape (timing and memory only)"
# torchvision models train with the paper's conv-net recipe (SGD with momentum, delta_t 100).
TORCHVISION_RECIPE = "cifar10_resnet18"


@dataclass(frozen=True)
class BenchModel:
    """A benchmarked architecture: the preset its recipe comes from and the defaults that fit 2 CPUs.

    ``architecture`` replaces the preset's ``model.name`` (``torchvision:NAME``)."""

    preset: str
    input_shape: tuple[int, int, int]
    widths: tuple[int, ...] = ()
    batch_size: int = 256
    repeats: int = 10
    samples: int = 16
    sparsities: tuple[float, ...] = (0.9, 0.95, 0.98)
    note: str = ""
    architecture: Optional[str] = None

    @property
    def name(self) -> str:
        """The architecture as ``ssvi train --model`` names it."""
        return self.architecture or load_preset(self.preset).model.name


BENCH_MODELS: Registry[BenchModel] = Registry("bench model")
BENCH_MODELS.register("mlp")(BenchModel("mnist_mlp", (1, 28, 28), widths=(1024, 1024)))
BENCH_MODELS.register("lenet5")(BenchModel("mnist_lenet5", (1, 28, 28)))
BENCH_MODELS.register("resnet18")(BenchModel(
    "cifar10_resnet18", (3, 32, 32), batch_size=16, repeats=3, samples=4, sparsities=(0.95,),
    note="resnet18 defaults to batch 16, 3 repeats, S=4 and sparsity 0.95 only: a dense VI step takes "
         "seconds on 2 CPU cores"))


def bench_model(name: str) -> BenchModel:
    """A registered bench model, or ``torchvision:NAME`` (any torchvision classifier, built as
    ``ssvi train --model torchvision:NAME`` builds it, with the ``cifar10_resnet18`` recipe).
    An unknown name raises :class:`UnknownName` with the valid names (closest first)."""
    if name.startswith(TORCHVISION):
        check_model_name(name)
        return BenchModel(
            TORCHVISION_RECIPE, (3, 64, 64), batch_size=8, repeats=3, samples=4, sparsities=(0.95,),
            architecture=name,
            note=f"{name} defaults to 3x64x64 inputs, batch 8, 3 repeats, S=4 and sparsity 0.95 only, "
                 f"{NUM_CLASSES} classes, the {TORCHVISION_RECIPE} recipe (SGD with momentum)")
    if name not in BENCH_MODELS:
        raise UnknownName(BENCH_MODELS.unknown_message(name) + "; or torchvision:NAME for any torchvision classifier")
    return BENCH_MODELS.get(name)


@dataclass(frozen=True)
class BenchOptions:
    model: str = "mlp"
    sparsities: Optional[tuple[float, ...]] = None
    batch_size: Optional[int] = None
    samples: Optional[int] = None
    repeats: Optional[int] = None
    threads: Optional[int] = None
    input_size: Optional[int] = None  # height and width of the inputs (default: the model's)
    device: str = "cpu"
    warmup: int = 2
    seed: int = 0

    def resolved(self) -> "BenchOptions":
        """Fill every unset option from the model's defaults."""
        bm = bench_model(self.model)
        return replace(self, sparsities=tuple(self.sparsities or bm.sparsities),
                       batch_size=self.batch_size or bm.batch_size, samples=self.samples or bm.samples,
                       repeats=self.repeats or bm.repeats, threads=self.threads or torch.get_num_threads(),
                       input_size=self.input_size or bm.input_shape[-1])

    def model_spec(self) -> BenchModel:
        """The bench model with these options' input size."""
        bm = bench_model(self.model)
        size = self.input_size or bm.input_shape[-1]
        return replace(bm, input_shape=(bm.input_shape[0], size, size))


MAX_INPUT_SIZE = 4096  # --input-size: inputs of 4096 x 4096 pixels, beyond any benchmark here


def check_input(bm: BenchModel, batch_size: int) -> None:
    """Refuse, before anything is built, inputs the architecture cannot take. A torchvision model is
    probed with one training-mode forward pass on the ``meta`` device (shapes only, no memory)."""
    shape = "x".join(map(str, bm.input_shape))
    try:
        with torch.device("meta"):
            if bm.architecture is None:
                widths = bm.widths or load_preset(bm.preset).model.widths
                build_architecture(bm.name, bm.input_shape, NUM_CLASSES, LayerFactory(bayesian=False), widths)
                return
            base = torchvision_base(bm.architecture[len(TORCHVISION):], bm.input_shape, NUM_CLASSES)
    except (RuntimeError, ValueError, AssertionError) as exc:
        reason = (str(exc).splitlines() or [type(exc).__name__])[0].replace(SMALL_INPUT_HINT, "")  # train's advice
        raise ConfigError(f"{bm.name} cannot run on {shape} inputs ({reason}); choose another --input-size") from None
    reason = input_error(base.train(), bm.input_shape, batch_size)
    if reason is not None:
        raise ConfigError(f"{bm.name} cannot run on {shape} inputs at batch {batch_size} in training mode ({reason}); "
                          "choose another --input-size")


def synthetic_splits(bm: BenchModel, batch_size: int, seed: int) -> tuple[DataSplits, torch.Tensor, torch.Tensor]:
    """One random minibatch of ``bm``'s input shape (the training and test split alike)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, *bm.input_shape, generator=gen)
    y = torch.randint(0, NUM_CLASSES, (batch_size,), generator=gen)
    c = bm.input_shape[0]
    spec = DataSpec("synthetic", bm.input_shape, NUM_CLASSES, tuple(str(i) for i in range(NUM_CLASSES)),
                    (0.0,) * c, (1.0,) * c)
    ds = TensorDataset(x, y)
    return DataSplits(ds, TensorDataset(x[:0], y[:0]), ds, spec), x, y


def bench_config(bm: BenchModel, opts: BenchOptions, method: str, sparsity: float, kernel: str,
                 delta_t: int) -> Config:
    """The recipe of ``bm`` for one variant."""
    overrides: dict[str, Any] = {
        "sparse.method": method, "sparse.sparsity": sparsity, "train.kernel": kernel,
        "train.device": opts.device, "train.batch_size": opts.batch_size, "train.seed": opts.seed,
        # Many epochs so that the step-0 cosine schedules stay flat over the timed steps.
        "train.epochs": 100_000, "sparse.delta_t": delta_t, "sparse.addition": "sample",
        # Every sparse layer at the named sparsity, whatever allocation the preset trains with.
        "sparse.allocation": "uniform",
    }
    if bm.widths:
        overrides["model.widths"] = list(bm.widths)
    if bm.architecture:
        overrides["model.name"] = bm.architecture
    return from_preset(bm.preset, overrides)
