import pytest

from ssvi_cli import config as C


def test_override_types_and_round_trip():
    cfg = C.apply_overrides(C.Config(), {"model.widths": "64,32", "sparse.sparsity": "0.9",
                                         "data.augment": "false", "data.max_train": "null"})
    assert cfg.model.widths == (64, 32) and cfg.sparse.sparsity == 0.9 and cfg.data.augment is False
    assert C.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("key,value,needle", [
    ("sparse.sparsity", 1.0, "[0, 1)"),
    ("sparse.sparsity", -0.1, "[0, 1)"),
    ("sparse.method", "magic", "valid values are: ssvi, vi, static, rigl, dense"),
    ("sparse.addition", "accumulate:x", "accumulate:N"),
    ("sparse.addition", "accumulate:200", "N < delta_t"),
    ("train.epochs", "ten", "integer"),
    ("train.device", "tpu", "auto, cpu, cuda"),
    ("nosuch.key", 1, "valid keys are"),
    ("sparse.nosuch", 1, "valid keys in 'sparse'"),
    ("optim.lr", 0, "> 0"),
])
def test_bad_values_are_rejected_with_the_choices(key, value, needle):
    with pytest.raises(C.ConfigError) as exc:
        C.apply_overrides(C.Config(), {key: value})
    assert needle in str(exc.value)


def test_parse_override_reads_yaml_scalars_not_code():
    key, value = C.parse_override("optim.lr=1e-3")
    assert C.apply_overrides(C.Config(), {key: value}).optim.lr == 1e-3
    assert C.parse_override("model.widths=[8, 8]") == ("model.widths", [8, 8])
    assert C.parse_override("data.name=__import__('os')")[1] == "__import__('os')"
    with pytest.raises(C.ConfigError):
        C.parse_override("novalue")


def test_unknown_preset_lists_valid_names():
    with pytest.raises(C.ConfigError) as exc:
        C.load_preset("nope")
    assert "digits_mlp" in str(exc.value)
