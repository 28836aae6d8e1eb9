"""The values Tab completes after a flag (``ssvi --install-completion`` installs it for the shell):
read without torch, as ``--help`` is, so that a Tab costs one start of the command line. The names
held by registries below torch (architectures, datasets, removal criteria, OOD sets) are listed here
by hand; tests/test_registry.py fails until a name registered since is listed. Where nothing here
matches (a path), the shell completes file names itself."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable

from ssvi_cli import config as cfgmod

# torchvision:NAME and imagefolder:PATH are not offered: the shell would put a space after the colon
# (its completion script asks for none to be left out), and the builders' names need torchvision.
MODELS = ("mlp", "lenet5", "resnet18", "vgg16", "vgg19")
BENCH_MODELS = ("mlp", "lenet5", "resnet18")
DATASETS = ("digits", "mnist", "fashion-mnist", "kmnist", "cifar10", "cifar100", "svhn")
CRITERIA = ("mean", "snr", "e_abs", "snr_abs", "e_exp", "snr_exp")
# evaluate --ood's names: its own sets, the held-out classes, every dataset's test split but the digits'
OOD = ("noise", "sklearn-photos", "heldout", *(d for d in DATASETS if d != "digits"))
MODES = ("mc", "mean")
DTYPES = ("float32", "float16", "bfloat16")  # the model file's (modelfile.header imports torch)
SPLITS = ("test", "val", "all")


def _matching(choices: Iterable[str], incomplete: str, listed: bool) -> list[str]:
    """The choices that begin ``incomplete``; ``listed``: of its last comma-separated item, the items
    before it kept (``ssvi,ri`` gives ``ssvi,rigl``)."""
    head, comma, last = incomplete.rpartition(",") if listed else ("", "", incomplete)
    given = set(head.split(",")) if comma else set()  # a list's items already there are not offered again
    return [head + comma + choice for choice in choices if choice.startswith(last) and choice not in given]


def of(choices: Iterable[str], listed: bool = False) -> Callable[[str], list[str]]:
    """A flag's completion over fixed ``choices`` (``listed``: a comma-separated list of them)."""
    fixed = tuple(choices)

    def complete(incomplete: str) -> list[str]:
        return _matching(fixed, incomplete, listed)

    return complete


def presets(incomplete: str) -> list[str]:
    """The shipped presets' names, and the preset files (YAML, JSON) in the working folder; a path
    with a folder in it is the shell's own completion."""
    if "/" in incomplete or "\\" in incomplete:
        return []
    try:
        files = sorted(p.name for p in Path.cwd().iterdir() if p.suffix.lower() in cfgmod.PRESET_SUFFIXES and p.is_file())
    except OSError:  # a working folder removed or unreadable
        files = []
    return _matching([*cfgmod.list_presets(), *files], incomplete, listed=False)


def _method_names() -> list[str]:
    from ssvi_cli.methods import METHODS  # the registry itself: no torch below it

    return METHODS.names()


def methods(incomplete: str) -> list[str]:
    return _matching(_method_names(), incomplete, listed=False)


def method_lists(incomplete: str) -> list[str]:
    return _matching(_method_names(), incomplete, listed=True)


devices = of(cfgmod.DEVICES)
kernels = of(cfgmod.KERNELS)
