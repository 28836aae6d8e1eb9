import shlex

import pytest

from ssvi_cli import config as C
from ssvi_cli.core.criteria import criterion_names
from ssvi_cli.data import dataset_names, get_spec
from ssvi_cli.training.plan import init_model, make_model
from ssvi_cli.models import MODELS

import torch

PRESETS = C.list_presets()
REQUIRED = {"digits_mlp", "mnist_lenet5", "mnist_mlp", "cifar10_resnet18", "cifar100_resnet18", "cifar10_vgg19"}


def test_required_presets_ship():
    assert REQUIRED <= set(PRESETS)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_loads_validates_and_builds(name):
    cfg = C.load_preset(name)
    assert cfg.model.name in MODELS
    assert cfg.data.name in dataset_names()
    assert cfg.sparse.criterion in criterion_names()
    command = shlex.split(C.preset_command(PRESETS[name]))
    assert command[:2] == ["ssvi", "train"]
    if name != C.DEFAULT_PRESET:
        assert command[command.index("--preset") + 1] == name
    spec = get_spec(cfg.data.name)
    model = make_model(cfg, spec)
    init_model(model, cfg, torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model.eval()(torch.randn(2, *spec.input_shape))
    assert out.shape == (2, spec.num_classes)
