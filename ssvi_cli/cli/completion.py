"""The values Tab completes after a flag (``ssvi --install-completion`` installs it for the shell):
read without torch, as ``--help`` is, so that a Tab costs one start of the command line. The names
held by registries below torch (architectures, datasets, removal criteria, OOD sets) are listed here
by hand; tests/test_registry.py fails until a name registered since is listed. Where nothing here
matches (a path), the shell completes file names itself."""

from __future__ import annotations

from typing import Callable, Iterable

from ssvi_cli import config as cfgmod

MODELS = ("mlp", "lenet5", "resnet18", "vgg16", "vgg19", "torchvision:")
DATASETS = ("digits", "mnist", "fashion-mnist", "kmnist", "cifar10", "cifar100", "svhn", "imagefolder:")
CRITERIA = ("mean", "snr", "e_abs", "snr_abs", "e_exp", "snr_exp")
# evaluate --ood's names: its own sets, the held-out classes, every dataset's test split but the digits'
OOD = ("noise", "sklearn-photos", "heldout", *(d for d in DATASETS if d not in ("digits", "imagefolder:")))
MODES = ("mc", "mean")
DTYPES = ("float32", "float16", "bfloat16")  # the model file's (modelfile.header imports torch)


def _matching(choices: Iterable[str], incomplete: str, listed: bool) -> list[str]:
    """The choices that begin ``incomplete``; ``listed``: of its last comma-separated item, the items
    before it kept (``ssvi,ri`` gives ``ssvi,rigl``)."""
    head, comma, last = incomplete.rpartition(",") if listed else ("", "", incomplete)
    return [head + comma + choice for choice in choices if choice.startswith(last)]


def of(choices: Iterable[str], listed: bool = False) -> Callable[[str], list[str]]:
    """A flag's completion over fixed ``choices`` (``listed``: a comma-separated list of them)."""
    fixed = tuple(choices)

    def complete(incomplete: str) -> list[str]:
        return _matching(fixed, incomplete, listed)

    return complete


def presets(incomplete: str) -> list[str]:
    """The shipped presets' names (a YAML file's path: the shell's own completion)."""
    return _matching(cfgmod.list_presets(), incomplete, listed=False)


def _method_names() -> list[str]:
    from ssvi_cli.methods import METHODS  # the registry itself: no torch below it

    return METHODS.names()


def methods(incomplete: str) -> list[str]:
    return _matching(_method_names(), incomplete, listed=False)


def method_lists(incomplete: str) -> list[str]:
    return _matching(_method_names(), incomplete, listed=True)


devices = of(cfgmod.DEVICES)
kernels = of(cfgmod.KERNELS)
