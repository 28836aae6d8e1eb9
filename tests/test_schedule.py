"""The subspace schedule's spacing: ``sparse.delta_t`` as a number (the paper's 100) or ``auto``
(fitted to the run's length, ``core/subspace.py: resolve_delta_t``), in the rule's arithmetic, the
trainer, the CLI's summary and the public loop API."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import ssvi_cli as ssvi
from ssvi_cli import config as C
from ssvi_cli.cli import run
from ssvi_cli.core.flops import recipe_flops, subspace_captures
from ssvi_cli.core.subspace import Schedule, resolve_delta_t
from ssvi_cli.data import get_spec
from ssvi_cli.fileio import read_jsonl
from ssvi_cli.training.plan import init_model, make_model
from ssvi_cli.training.trainer import Trainer

# digits: 1293 training images, batch 64 -> 21 steps per epoch; 2 epochs -> 42 steps, t_end = 31.
DIGITS_STEPS_2_EPOCHS = 42
QUICK = ["--epochs", "2", "--set", "train.eval_samples=2"]


def counted(schedule: Schedule, total: int) -> int:
    """Subspace steps by walking the schedule (independent of ``Schedule.updates``)."""
    return sum(schedule.is_update(t) for t in range(total))


@pytest.mark.parametrize("min_steps", [1, 7, 10, 100, 250])
def test_auto_gives_a_short_run_at_least_the_target(min_steps):
    for t_end in range(1, 4000, 37):
        dt = resolve_delta_t("auto", t_end, min_steps)
        schedule = Schedule(dt, 0.3, t_end)
        steps = counted(schedule, t_end + 5)
        assert steps == schedule.updates
        assert 2 <= dt <= 100
        if t_end - 1 >= 2 * min_steps:  # the run has room for the target at the smallest spacing
            assert steps >= min_steps, (t_end, dt)
        else:  # it has not: as many as a spacing of 2 allows
            assert dt == 2 and steps == (t_end - 1) // 2


def test_auto_counts_the_open_interval_up_to_t_end():
    """floor(t_end / min_steps) would give 99 steps here; the rule keeps the target."""
    assert resolve_delta_t("auto", 1000, 100) == 9
    assert Schedule(9, 0.3, 1000).updates == 111
    assert Schedule(10, 0.3, 1000).updates == 99


def test_auto_keeps_the_papers_100_on_a_long_run():
    # CIFAR's 200 epochs of 391 steps: t_end = 58650
    assert resolve_delta_t("auto", 58_650, 100) == 100
    assert resolve_delta_t("auto", 100 * 100 + 1, 100) == 100  # the shortest run that keeps it
    assert resolve_delta_t("auto", 100 * 100, 100) == 99
    assert resolve_delta_t("auto", 10 ** 7, 586) == 100


def test_explicit_values_are_used_as_given():
    for t_end in (5, 31, 58_650):
        assert resolve_delta_t(100, t_end, 100) == 100
        assert resolve_delta_t(7, t_end, 1000) == 7
    assert Schedule.fitted(100, 0.3, 58_650).updates == 586


def test_auto_leaves_room_for_accumulated_gradients():
    assert resolve_delta_t("auto", 50, 100, accumulate=4) == 5
    schedule = Schedule.fitted("auto", 0.3, 50, accumulate=4, min_steps=100)
    captures = sum(schedule.captures(t) for t in range(60))
    assert captures == subspace_captures(60, schedule.delta_t, 50, 4) == 4 * schedule.updates


@pytest.mark.parametrize("bad", ["often", 0, -3, True, 2.5])
def test_bad_delta_t_is_refused(bad):
    with pytest.raises(ValueError, match="delta_t"):
        resolve_delta_t(bad, 100, 10)
    with pytest.raises(ValueError, match="min_subspace_steps"):
        resolve_delta_t("auto", 100, 0)


def test_recipe_flops_resolve_auto_as_the_trainer_does():
    from ssvi_cli.core.allocation import layer_densities
    from ssvi_cli.core.flops import model_geometry
    from ssvi_cli.core.layers import sparse_layers

    cfg = C.load_preset("digits_mlp")
    model = make_model(cfg, get_spec("digits"))
    geom = model_geometry(model, (1, 8, 8))
    dens = layer_densities(sparse_layers(model), 0.05, "uniform", dense_stem=True)
    kw = dict(n_train=1293, epochs=60, batch_size=64, t_end=0.75)
    auto = recipe_flops(geom, "ssvi", dens, delta_t="auto", min_subspace_steps=100, **kw)
    fixed = recipe_flops(geom, "ssvi", dens, delta_t=9, **kw)  # 1260 steps, t_end 945: auto picks 9
    assert auto == fixed and auto.captures == 104
    assert recipe_flops(geom, "ssvi", dens, delta_t=50, **kw).captures == 18
    # another min_subspace_steps than the default (100, as above) reaches the count: the trainer's ΔT
    sparse = C.apply_overrides(cfg, {"sparse.delta_t": "auto", "sparse.min_subspace_steps": 40}).sparse
    trainers = Schedule.from_config(sparse, 1260).delta_t
    assert trainers > 9 and sparse.t_end == kw["t_end"]
    auto = recipe_flops(geom, "ssvi", dens, delta_t="auto", min_subspace_steps=40, **kw)
    assert auto == recipe_flops(geom, "ssvi", dens, delta_t=trainers, **kw) and auto.captures < 104


# ---------------------------------------------------------------- config


def test_config_takes_auto_a_number_and_names_the_choices():
    cfg = C.apply_overrides(C.Config(), {"sparse.delta_t": "auto", "sparse.min_subspace_steps": 30})
    assert cfg.sparse.delta_t == "auto" and cfg.sparse.min_subspace_steps == 30
    assert C.apply_overrides(C.Config(), {"sparse.delta_t": "100"}).sparse.delta_t == 100
    assert C.Config().sparse.delta_t == 100  # the paper's, unless a preset says otherwise
    assert "delta_t: auto" in C.dump_yaml(cfg)
    assert C.from_dict(cfg.to_dict()) == cfg
    for bad, needle in (("often", "or auto"), (1, "integer >= 2"), (None, "an integer or a word")):
        with pytest.raises(C.ConfigError, match=needle):
            C.apply_overrides(C.Config(), {"sparse.delta_t": bad})
    with pytest.raises(C.ConfigError, match="at most 100"):
        C.apply_overrides(C.Config(), {"sparse.delta_t": "auto", "sparse.addition": "accumulate:100"})
    with pytest.raises(C.ConfigError, match="min_subspace_steps"):
        C.apply_overrides(C.Config(), {"sparse.min_subspace_steps": 0})


# ---------------------------------------------------------------- training


def test_trainer_resolves_auto_from_the_runs_steps(tmp_path: Path):
    cfg = C.apply_overrides(C.load_preset("digits_mlp"), {"train.epochs": 2, "sparse.delta_t": "auto"})
    trainer = Trainer.create(cfg, tmp_path / "run")
    assert trainer.total_steps == DIGITS_STEPS_2_EPOCHS
    # t_end = 31: the default target (100) does not fit, so the closest spacing the run allows
    assert trainer.schedule.delta_t == 2 and trainer.schedule.updates == 15


def test_train_auto_reports_the_resolved_delta_t_and_reaches_the_target(tmp_path: Path, capsys):
    out = tmp_path / "auto"
    code = run(["train", "--out", str(out), *QUICK, "--set", "sparse.delta_t=auto",
                "--set", "sparse.min_subspace_steps=10"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    summary = json.loads((out / "summary.json").read_text())
    # floor((31 - 1) / 10) = 3: steps 3, 6, ..., 30
    assert summary["delta_t"] == 3 and summary["delta_t_auto"] is True
    assert summary["subspace_steps"] == 10
    assert [r["step"] for r in read_jsonl(out / "support.jsonl")] == list(range(3, 31, 3))
    assert "10 (delta_t 3, auto)" in captured.out
    assert "delta_t: auto" in (out / "config.yaml").read_text()  # reruns re-fit to their own length


def test_a_run_records_the_criteria_overlap_at_ten_subspace_steps_from_its_first_to_its_last_that_drops(
        tmp_path: Path):
    """Every subspace step scored the six criteria over every layer, half as long again as the step.
    The ten span the steps that drop an entry: the report's "late" stage is the last of those."""
    largest = int(0.05 * 3 * 3 * 512 * 512)  # the paper's ResNet-18 recipe at 0.95: its largest conv
    paper = Schedule(100, 0.3, 52800)  # 527 subspace steps; the last, at f = 2.7e-6, drops no entry
    assert paper.updates == 527 and paper.last_dropping(largest) == 526
    assert [100 * k for k in range(1, 528) if paper.records_overlap(100 * k, largest)] == [
        100, 5900, 11800, 17600, 23400, 29300, 35100, 40900, 46800, 52600]
    digits = Schedule(50, 0.3, 945)  # digits_mlp (1,260 steps); the report's early 50, middle 500, late 900
    assert [50 * k for k in range(1, 19) if digits.records_overlap(50 * k, 7239)] == [
        50, 150, 250, 350, 450, 500, 600, 700, 800, 900]
    assert all(Schedule(50, 0.3, 330).records_overlap(50 * k, 7239) for k in range(1, 7))  # a short run: each
    assert [k for k in range(1, 528) if paper.records_overlap(100 * k, largest, most=1)] == [1, 526]
    assert not any(paper.records_overlap(100 * k, 0) for k in range(1, 528))  # nothing moves: no record
    out = tmp_path / "run"
    assert run(["train", "--out", str(out), *QUICK, "--set", "sparse.delta_t=2"]) == 0  # 15 subspace steps
    records = read_jsonl(out / "support.jsonl")
    dropping = [r["step"] for r in records if sum(layer["dropped"] for layer in r["layers"].values())]
    recorded = [r["step"] for r in records if r["criteria_iou"]]
    assert len(records) == 15 and len(recorded) == 10
    assert recorded[0] == dropping[0] == 2 and recorded[-1] == dropping[-1] and set(recorded) <= set(dropping)


def test_train_explicit_100_behaves_as_before(tmp_path: Path, capsys):
    out = tmp_path / "fixed"
    code = run(["train", "--out", str(out), *QUICK, "--set", "sparse.delta_t=100", "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    summary = json.loads(captured.out)
    assert summary["delta_t"] == 100 and summary["delta_t_auto"] is False
    assert summary["subspace_steps"] == 0  # t_end = 31 < 100: the paper's spacing never fires
    assert not (out / "support.jsonl").exists() or not read_jsonl(out / "support.jsonl")


def test_bad_delta_t_is_a_one_line_error_before_anything_is_written(tmp_path: Path, capsys):
    for value, needle in (("often", "or auto"), ("0", ">= 2")):
        code = run(["train", "--out", str(tmp_path / "run"), "--set", f"sparse.delta_t={value}"])
        err = capsys.readouterr().err
        assert code == 2 and needle in err and "Traceback" not in err, err
        assert len(err.strip().splitlines()) == 1, err
    assert not any(tmp_path.iterdir())


# ---------------------------------------------------------------- public loop API


def test_subspace_api_takes_the_same_rule():
    cfg = C.apply_overrides(C.load_preset("digits_mlp"), {"sparse.sparsity": 0.8, "model.widths": [32]})
    model = make_model(cfg, get_spec("digits"))
    init_model(model, cfg, torch.Generator().manual_seed(0))
    optimizer = torch.optim.SGD(ssvi.param_groups(model, lr=0.01, lr_sigma=0.01), momentum=0.9)
    subspace = ssvi.Subspace(model, optimizer, total_steps=40, delta_t="auto", min_subspace_steps=5)
    assert subspace.schedule.delta_t == resolve_delta_t("auto", 30, 5) == 5
    gen = torch.Generator().manual_seed(0)
    moved = []
    for _ in range(40):
        x, y = torch.randn(16, 1, 8, 8, generator=gen), torch.randint(0, 10, (16,), generator=gen)
        F.cross_entropy(model(x), y).backward()
        moved.append(subspace.step())
        optimizer.zero_grad()
    assert [t for t, m in enumerate(moved) if m] == [5, 10, 15, 20, 25]
    assert ssvi.Subspace(model, optimizer, total_steps=40).schedule.delta_t == 100
    with pytest.raises(ValueError, match="delta_t"):
        ssvi.Subspace(model, optimizer, total_steps=40, delta_t="sometimes")


# ---------------------------------------------------------------- the CIFAR recipe without a validation split


def test_cifar_preset_trains_without_a_validation_split(tmp_path: Path, monkeypatch, capsys):
    """The paper's recipe on a tiny fake CIFAR-10 (a small MLP in place of the ResNet, for time):
    every training image is trained on, no validation pass runs, and the final model is the last
    epoch (test metrics only in the summary)."""
    from tests.fixtures_torchvision import accept_fixture_checksums, write_cifar10

    root = tmp_path / "data"
    write_cifar10(root, n_train=50, n_test=20)
    accept_fixture_checksums(monkeypatch, root)
    out = tmp_path / "run"
    code = run(["train", "--preset", "cifar10_resnet18", "--model", "mlp", "--set", "model.widths=[16]",
                "--device", "cpu", "--data-dir", str(root), "--out", str(out), "--epochs", "2",
                "--batch-size", "10", "--set", "train.eval_samples=2", "--set", "sparse.delta_t=3", "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    summary = json.loads(captured.out)
    # 50 images in 5 batches per epoch, 10 steps, t_end = 7: subspace steps at 3 and 6
    assert summary["steps"] == 10 and summary["subspace_steps"] == 2 and summary["delta_t"] == 3
    records = read_jsonl(out / "metrics.jsonl")
    assert [r["val_accuracy"] for r in records] == [None, None]
    assert "val_fraction: 0.0" in (out / "config.yaml").read_text()
    assert summary["test_accuracy"] is not None and summary["epochs"] == 2
    code = run(["evaluate", str(out / "model.safetensors"), "--split", "val", "--data-dir", str(root)])
    err = capsys.readouterr().err
    assert code == 2 and "no validation split; use --split test" in err and "Traceback" not in err, err


def test_t_end_is_read_as_the_decimal_it_is_written_as():
    # int(0.57 * 100) is 56 in binary floating point: the remove-and-add step at 56 (delta_t 4) was lost
    from ssvi_cli.core.subspace import end_step

    assert 0.57 * 100 < 57 and end_step(0.57, 100) == 57 and end_step(0.75, 42) == 31 and end_step(0.0, 9) == 0
    assert all(end_step(k / 100, 100) == k for k in range(101))
    sparse = C.apply_overrides(C.load_preset("digits_mlp"), {"sparse.t_end": 0.57, "sparse.delta_t": 4}).sparse
    schedule = Schedule.from_config(sparse, 100)
    assert schedule.t_end == 57 and schedule.is_update(56) and schedule.updates == 14
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 2))
    ssvi.sparsify(model, 0.5)
    optimizer = torch.optim.SGD(ssvi.param_groups(model, 0.1, 0.01), lr=0.1)
    assert ssvi.Subspace(model, optimizer, total_steps=100, delta_t=4, t_end=0.57).schedule.t_end == 57
    from ssvi_cli.core.allocation import layer_densities
    from ssvi_cli.core.flops import model_geometry
    from ssvi_cli.core.layers import sparse_layers

    digits = make_model(C.load_preset("digits_mlp"), get_spec("digits"))
    geom, dens = model_geometry(digits, (1, 8, 8)), layer_densities(sparse_layers(digits), 0.05, "uniform", dense_stem=True)
    assert recipe_flops(geom, "ssvi", dens, n_train=1600, epochs=1, batch_size=16, delta_t=4, t_end=0.57).captures == 14
