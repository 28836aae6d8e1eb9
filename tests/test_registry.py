"""One registry idiom: every name a user types resolves through a Registry, an unknown name lists the
valid ones (closest first), and the config's choices are exactly the registries' names."""

import pytest

from ssvi_cli import config as C
from ssvi_cli.core.allocation import ALLOCATIONS, AllocationError
from ssvi_cli.core.criteria import REMOVAL_CRITERIA, CriterionError
from ssvi_cli.core.gaussian import SIGMA_PARAMS
from ssvi_cli.core.kernels import KERNELS
from ssvi_cli.data import DATASETS, OOD_SETS, DataError
from ssvi_cli.methods import METHODS
from ssvi_cli.models import MODELS
from ssvi_cli.registry import Registry, UnknownName
from ssvi_cli.training.optim import LR_SCHEDULES, OPTIMIZERS


def test_config_choices_are_the_registries_names():
    assert set(C.OPTIMIZERS) == set(OPTIMIZERS.names())
    assert set(C.SCHEDULES) == set(LR_SCHEDULES.names())
    assert set(C.ALLOCATIONS) == set(ALLOCATIONS.names())
    assert set(C.SIGMA_PARAMS) == set(SIGMA_PARAMS.names())
    assert set(C.KERNELS) == set(KERNELS.names()) - {"prediction"}  # which infer uses, no config's choice


@pytest.mark.parametrize("registry, family", [
    (MODELS, UnknownName), (DATASETS, DataError), (OOD_SETS, DataError), (REMOVAL_CRITERIA, CriterionError),
    (ALLOCATIONS, AllocationError), (METHODS, UnknownName), (KERNELS, UnknownName), (OPTIMIZERS, UnknownName),
])
def test_an_unknown_name_is_one_error_listing_the_valid_names(registry: Registry, family):
    name = registry.names()[0]
    with pytest.raises(UnknownName) as info:
        registry.get(name + "x")
    assert isinstance(info.value, family)
    message = str(info.value)
    assert message.startswith(f"unknown {registry.kind} '{name}x'; valid names are: ")
    assert all(n in message for n in registry.names())
    assert f"did you mean {name}" in message


def test_a_method_is_an_object_not_a_string():
    assert [(m.name, m.bayesian, m.dense, m.moves_support) for _, m in METHODS.items()] == [
        ("ssvi", True, False, True), ("vi", True, True, False), ("static", True, False, False),
        ("rigl", False, False, True), ("dense", False, True, False)]
    cfg = C.apply_overrides(C.Config(), {"sparse.method": "vi", "sparse.sparsity": 0.9})
    assert cfg.method is METHODS.get("vi") and cfg.density == 1.0


@pytest.mark.parametrize("command, flag, registry, listed", [
    ("train", "model", MODELS, r"Architecture: (.*?), or torchvision"),
    ("train", "data", DATASETS, r"Dataset: (.*?), or imagefolder"),
    ("train", "criterion", REMOVAL_CRITERIA, r"Removal criterion: (.*)"),
    ("train", "method", METHODS, r"(.*)"),
    ("sweep", "method", METHODS, r"comma-separated: (\S+)"),
    ("train", "kernel", KERNELS, r"Weight products: (.*)"),
    ("evaluate", "ood", OOD_SETS, r"a name \((.*?)\); heldout"),
])
def test_each_flags_help_names_every_registered_choice(command, flag, registry, listed):
    """The help texts list the names by hand (the registries live below torch, which --help does not
    import): a name registered since, or dropped, has to be said there too. Only the list is read (a
    name may also be an ordinary word of the help: "dense ones ignore --sparsity")."""
    import re

    import typer.main

    from ssvi_cli.cli.app import app

    params = {p.name: p for p in typer.main.get_command(app).commands[command].params}
    (segment,) = re.findall(listed, params[flag].help)[:1]
    said = set(re.findall(r"[a-z][a-z0-9_-]*", re.sub(r"\([^)]*\)", "", segment)))
    names = set(registry.names()) - {"prediction"}  # infer's kernel, no choice of train's
    assert names <= said, sorted(names - said)


def test_the_values_tab_completes_are_the_registries_names():
    """Tab's names are listed by hand (completion reads no torch): a name registered since, or dropped,
    has to be listed there too."""
    from ssvi_cli.cli import completion
    from ssvi_cli.data.ood import HELDOUT
    from ssvi_cli.modelfile import DTYPES
    from ssvi_cli.prediction import MODES

    from ssvi_cli.bench.models import BENCH_MODELS

    assert set(completion.MODELS) == set(MODELS.names()) and set(completion.BENCH_MODELS) == set(BENCH_MODELS.names())
    assert set(completion.DATASETS) == set(DATASETS.names())
    from ssvi_cli.evaluation.inputs import SPLITS

    assert completion.SPLITS == SPLITS and completion.presets("digits") == ["digits_mlp"]
    assert set(completion.CRITERIA) == set(REMOVAL_CRITERIA.names())
    assert set(completion.OOD) == set(OOD_SETS.names()) | {HELDOUT}
    assert completion.DTYPES == DTYPES and completion.MODES == MODES
    assert completion.methods("") == METHODS.names() and completion.method_lists("ssvi,s") == ["ssvi,static"]
    assert completion.presets("digits") == ["digits_mlp"] and completion.devices("c") == ["cpu", "cuda"]


def test_the_models_classes_keep_the_path_they_had_before_the_package_was_split():
    """A model pickled whole names its classes by module path, and ssvi_cli.save records a custom
    model's class as custom:MODULE.CLASS: ssvi_cli.models.ResNet18 and its BasicBlock must stay there."""
    import pickle

    import ssvi_cli.models as models
    from ssvi_cli.models import LayerFactory, build_architecture

    for name, shape in (("mlp", (1, 8, 8)), ("lenet5", (1, 28, 28)), ("resnet18", (3, 32, 32)), ("vgg16", (3, 32, 32))):
        model = build_architecture(name, shape, 10, LayerFactory(bayesian=True))
        ours = {type(m) for m in model.modules() if type(m).__module__.startswith("ssvi_cli.models")}
        assert ours and all(getattr(models, c.__qualname__) is c and c.__module__ == "ssvi_cli.models" for c in ours)
        assert type(pickle.loads(pickle.dumps(model))) is type(model)
