import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ssvi_cli.cli import run
from ssvi_cli.fileio import read_jsonl


def test_a_runs_config_says_where_it_came_from_and_a_resume_keeps_it(tmp_path: Path, monkeypatch):
    """A run from a user's preset file was named after the file's stem and its config.yaml did not say
    which file it was: a shipped preset's name and a file of one's own read alike."""
    from ssvi_cli import config as C
    from ssvi_cli.runs.rundir import RunDir
    from ssvi_cli.training.records import config_note

    monkeypatch.chdir(tmp_path)
    Path("digits_mlp.yaml").write_text("model: {name: mlp, widths: [8]}\ndata: {name: digits}\n")
    assert run(["train", "--preset", "digits_mlp.yaml", "--epochs", "1", "--out", "mine",
                "--set", "train.eval_samples=1", "--json"]) == 0
    first = Path("mine/config.yaml").read_text().splitlines()[0]
    assert first == (f"# from the preset file {tmp_path / 'digits_mlp.yaml'}, then this command line's flags and "
                     "--set values; the values below are what ran")
    assert run(["train", "--init-from", "mine", "--epochs", "1", "--out", "next", "--json",
                "--set", "train.eval_samples=1"]) == 0
    assert Path("next/config.yaml").read_text().startswith(
        f"# from the config of the trained model {tmp_path / 'mine' / 'model.safetensors'} (--init-from), then")
    cfg = C.load_preset(str(tmp_path / "mine" / "config.yaml"))
    assert config_note(cfg.train.batch_size, cfg, RunDir(tmp_path / "mine")) == first + "\n"
    Path("mine/summary.json").unlink()  # as if stopped after its last checkpoint: the resume writes config.yaml again
    Path("mine/model.safetensors").unlink()
    assert run(["train", "--resume", "mine", "--json"]) == 0
    assert Path("mine/config.yaml").read_text().splitlines()[0] == first  # kept
    assert config_note(cfg.train.batch_size, cfg, RunDir(tmp_path / "none")) == ""


def test_train_json_summary_and_run_directory(tmp_path: Path, capsys):
    out = tmp_path / "run"
    code = run(["train", "--out", str(out), "--epochs", "2", "--set", "train.eval_samples=2", "--json",
                "--kernel", "sparse"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "kernel: sparse" in (out / "config.yaml").read_text()
    assert (out / "config.yaml").read_text().startswith("# from the preset digits_mlp, then this command line's")
    summary = json.loads(captured.out)
    assert summary["method"] == "ssvi" and summary["test_samples"] == 2
    assert abs(summary["density"] - 0.05) < 1e-4
    assert summary["test_accuracy"] > 0.5
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "model.safetensors"):
        assert (out / name).is_file(), name
    records = read_jsonl(out / "metrics.jsonl")
    assert [r["epoch"] for r in records] == [1, 2]
    for key in ("loss", "nll", "kl", "kl_weight", "lr", "val_accuracy", "val_nll", "layer_density",
                "drop_fraction", "subspace_steps", "seconds"):
        assert key in records[0], key
    assert list((out / "checkpoints").glob("checkpoint-*.pt"))


def test_existing_run_directory_is_not_overwritten_without_force(tmp_path: Path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    code = run(["train", "--out", str(out), "--epochs", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "holds keep.txt and is not a run folder" in err and "Traceback" not in err
    assert (out / "keep.txt").read_text() == "precious"
    # --force replaces a run, never a folder that is not one, and removes only the run's own files.
    assert run(["train", "--out", str(out), "--epochs", "1", "--force"]) == 2
    assert "(--force replaces only a run)" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    other = tmp_path / "other-project"  # another tool's run: its config.yaml is not an ssvi config
    (other / "checkpoints").mkdir(parents=True)
    (other / "config.yaml").write_text("lr: 0.1\nmodel: resnet\n")
    assert run(["train", "--out", str(other), "--epochs", "1", "--force"]) == 2
    assert "is not a run folder" in capsys.readouterr().err and (other / "checkpoints").is_dir()
    tiny = ["--epochs", "1", "--set", "model.widths=[8]", "--set", "data.max_train=64", "--set", "train.eval_samples=1"]
    assert run(["train", "--out", str(tmp_path / "r"), *tiny]) == 0
    (tmp_path / "r" / "notes.txt").write_text("mine")
    assert run(["train", "--out", str(tmp_path / "r"), *tiny]) == 2
    assert "already holds a finished run; pass --force" in capsys.readouterr().err
    first = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert run(["train", "--out", str(tmp_path / "r"), *tiny, "--seed", "1", "--force"]) == 0
    assert (tmp_path / "r" / "notes.txt").read_text() == "mine"
    second = (tmp_path / "r" / "summary.json").read_text()
    assert json.loads(second) != first
    # A finished run has nothing to resume: its summary is printed, nothing is rewritten.
    model_bytes = (tmp_path / "r" / "model.safetensors").read_bytes()
    capsys.readouterr()
    assert run(["train", "--resume", str(tmp_path / "r"), "--json"]) == 0
    captured = capsys.readouterr()
    printed = json.loads(captured.out)
    assert "has finished" in captured.err and [n for n in printed.pop("notes") if "has finished" in n]
    assert printed == json.loads(second)  # the summary, with notes as a finished run's --json has them
    assert (tmp_path / "r" / "summary.json").read_text() == second
    assert (tmp_path / "r" / "model.safetensors").read_bytes() == model_bytes
    from ssvi_cli.training import launcher  # --nproc: said here, before any process starts

    def no_launch(*args, **kwargs):
        raise AssertionError("processes started to resume a finished run")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(launcher, "launch", no_launch)
        assert run(["train", "--resume", str(tmp_path / "r"), "--nproc", "2", "--device", "cpu"]) == 0
    assert "has finished" in capsys.readouterr().err


def test_bad_flags_give_one_line_errors(tmp_path: Path, capsys):
    cases = [
        (["train", "--method", "magic", "--out", str(tmp_path / "a")], "valid values are"),
        (["train", "--sparsity", "1.5", "--out", str(tmp_path / "b")], "[0, 1)"),
        (["train", "--criterion", "nope", "--out", str(tmp_path / "c")], "valid names are"),
        (["train", "--preset", "nope", "--out", str(tmp_path / "d")], "valid names are"),
        (["train", "--set", "model.name=alexnet", "--out", str(tmp_path / "e")], "valid names are"),
        (["train", "--set", "data.name=imagenet", "--out", str(tmp_path / "f")], "valid names are"),
        (["train", "--set", "bogus.key=1", "--out", str(tmp_path / "g")], "valid keys"),
        (["train", "--kernel", "csr", "--out", str(tmp_path / "h")], "valid values are"),
        # a key set twice was settled silently by the last value
        (["train", "--epochs", "1", "--set", "train.epochs=2", "--out", str(tmp_path / "i")],
         "train.epochs is given twice (--epochs and --set); give it once"),
        (["train", "--set", "optim.lr=0.1", "--set", "optim.lr=0.2", "--out", str(tmp_path / "j")],
         "optim.lr is given twice (two --set)"),
        (["train", "--seed", "-1", "--out", str(tmp_path / "k")], "train.seed=-1 must be in [0, 4294967295]"),
        # a flag given twice kept its last value: the first --preset was dropped in silence
        (["train", "--preset", "digits_mlp", "--preset", "mnist_mlp", "--out", str(tmp_path / "n")],
         "error: --preset is given twice; give it once (the last value would replace the others in silence)"),
        (["train", "--epochs", "1", "--set", "optim.lr=0.1", "--epochs=2", "--epochs", "3", "--out", str(tmp_path / "o")],
         "--epochs is given 3 times; give it once"),
        (["infer", "model.safetensors", "x.png", "--samples", "3", "--samples", "4"], "--samples is given twice"),
        (["sweep", "--seeds", "2", "--seeds", "3", "--dry-run", "--out", str(tmp_path / "p")], "--seeds is given twice"),
        (["evaluate", "model.safetensors", "-o", str(tmp_path / "q"), "--output", str(tmp_path / "r")],
         "--output is given twice"),
        (["train", "--model", "lenet5", "--out", str(tmp_path / "l")], "lenet5 needs inputs of at least 12x12, got 8x8"),
        (["train", "--model", "vgg16", "--out", str(tmp_path / "m")], "vgg16 needs inputs of at least 32x32, got 8x8"),
    ]
    for args, needle in cases:
        code = run(args)
        err = capsys.readouterr().err
        assert code == 2, (args, err)
        assert needle in err and "Traceback" not in err, (args, err)
    assert not any(tmp_path.iterdir())
    assert run(["infer", "m.safetensors", "x.png", "--samples", "3", "--samples", "4", "--help"]) == 0  # help first
    assert "Usage: ssvi infer" in capsys.readouterr().out


def test_presets_command_lists_presets(capsys):
    assert run(["presets", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {"digits_mlp", "cifar10_resnet18"} <= {r["name"] for r in rows}
    assert [r["name"] for r in rows if r["default"]] == ["digits_mlp"]  # what ssvi train runs without --preset
    assert run(["presets"]) == 0
    assert "digits_mlp (default)" in capsys.readouterr().out


def test_ctrl_c_in_any_command_says_interrupted_and_exits_130(capsys, monkeypatch):
    from ssvi_cli import config as cfgmod

    def ctrl_c():
        raise KeyboardInterrupt

    monkeypatch.setattr(cfgmod, "list_presets", ctrl_c)
    assert run(["presets"]) == 130
    assert capsys.readouterr().err.strip() == "interrupted"  # Typer alone exits 130 in silence
    # among --nproc's processes rank 0 alone says it (each of them said it, one line per process)
    for rank, said in (("1", ""), ("0", "interrupted")):
        with monkeypatch.context() as worker:
            for key, value in (("RANK", rank), ("LOCAL_RANK", rank), ("WORLD_SIZE", "2")):
                worker.setenv(key, value)
            assert run(["presets"]) == 130
        assert capsys.readouterr().err.strip() == said


def test_version_is_the_packages(capsys):
    """One version: the installed distribution's (pyproject.toml reads ssvi_cli/version.py) is the one
    --version prints, also where ssvi runs from a source tree that is not installed."""
    from importlib.metadata import version

    from ssvi_cli.version import __version__

    assert run(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"ssvi {__version__}" == f"ssvi {version('ssvi')}"


def test_presets_lists_the_good_ones_when_one_is_broken(tmp_path: Path, capsys, monkeypatch):
    from ssvi_cli import config as cfgmod

    (tmp_path / "mine.yaml").write_text("train: {epochs: 3}\n")  # no '# command' line of its own
    (tmp_path / "zz_empty.yaml").write_text("")
    monkeypatch.setattr(cfgmod, "presets_dir", lambda: tmp_path)
    assert run(["presets", "--json"]) == 0
    captured = capsys.readouterr()
    rows = json.loads(captured.out)
    assert [r["name"] for r in rows] == ["mine"] and rows[0]["command"] == "ssvi train --preset mine"
    assert "note: preset zz_empty is left out: preset " in captured.err and "is empty" in captured.err


def test_module_entry_point_shows_help():
    proc = subprocess.run([sys.executable, "-m", "ssvi_cli", "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "train" in proc.stdout


@pytest.mark.parametrize("command", [[], ["train"], ["sweep"], ["presets"]])
def test_dash_h_is_help_as_in_most_command_line_tools(command, capsys):
    """-h was refused ("No such option: -h") where --help answered."""
    assert run([*command, "-h"]) == 0
    said = capsys.readouterr().out
    assert "Usage: ssvi" in said and re.search(r"--help\s+-h\s", said)


def test_force_is_a_plain_flag(capsys):
    """--force showed a --no-force that meant nothing."""
    for command in ("train", "sweep"):
        assert run([command, "--help"]) == 0
        said = capsys.readouterr().out
        assert "--no-force" not in said and "--force" in said


def test_force_keeps_the_old_run_when_the_new_one_cannot_start(tmp_path: Path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    code = run(["train", "--out", str(out), "--force", "--set", "model.widths=[2]", "--sparsity", "0.99"])
    err = capsys.readouterr().err
    assert code == 2 and "no active weight" in err
    assert (out / "keep.txt").read_text() == "precious"
    code = run(["train", "--out", str(out), "--force", "--set", "data.name=mnist",
                "--set", f"data.data_dir={tmp_path / 'nodata'}"])
    err = capsys.readouterr().err
    assert code == 2 and "--download" in err
    assert (out / "keep.txt").read_text() == "precious"


SMALL = ["--epochs", "1", "--set", "model.widths=[8]", "--set", "data.max_train=64", "--set", "train.eval_samples=1"]


def test_force_puts_the_old_run_back_when_the_new_one_fails_before_its_first_checkpoint(tmp_path: Path, capsys,
                                                                                     monkeypatch):
    """What the checks before --force cannot see (a model too large to allocate, weights that give a
    non-finite first loss) failed the new run after the old one was removed: the folder held a lock."""
    import ssvi_cli.training.trainer as trainer_mod
    from ssvi_cli.runs.aside import ASIDE

    out = tmp_path / "run"
    assert run(["train", *SMALL, "--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"}
    real = trainer_mod.Trainer.from_plan
    monkeypatch.setattr(trainer_mod.Trainer, "from_plan", classmethod(
        lambda cls, *a, **k: (_ for _ in ()).throw(RuntimeError("cannot allocate 307200000000 bytes"))))
    assert run(["train", *SMALL, "--seed", "3", "--out", str(out), "--force"]) == 1
    err = capsys.readouterr().err
    assert f"the run that --force was replacing in {out} is put back: the new one ended before its first checkpoint" in err
    assert {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"} == before
    assert not (out / ASIDE).exists()
    # a new run that gets its checkpoint replaces the old one, as --force asked; nothing is left aside
    monkeypatch.setattr(trainer_mod.Trainer, "from_plan", real)
    assert run(["train", *SMALL, "--seed", "3", "--out", str(out), "--force"]) == 0
    assert "put back" not in capsys.readouterr().err and not (out / ASIDE).exists()
    assert "seed: 3" in (out / "config.yaml").read_text()


def test_a_run_left_aside_when_the_machine_stopped_is_settled_at_the_next_claim(tmp_path: Path, capsys):
    from ssvi_cli.runs.aside import ASIDE, set_aside
    from ssvi_cli.runs.rundir import RUN_ENTRIES, RunDir

    import shutil

    out = tmp_path / "run"
    assert run(["train", *SMALL, "--out", str(out)]) == 0
    old_config = (out / "config.yaml").read_text()
    # --force set the run aside; the new run wrote its config and nothing more, then the machine stopped
    set_aside(out, RUN_ENTRIES)
    (out / "config.yaml").write_text(old_config.replace("seed: 0", "seed: 7"))
    RunDir(out).claim(force=True)  # the next --force: the old run comes back first, then is set aside again
    assert (out / ASIDE / "config.yaml").read_text() == old_config and not (out / "config.yaml").exists()
    assert (out / ASIDE / "model.safetensors").is_file()
    # a new run that had its first checkpoint when the machine stopped is the one kept: the older run goes
    shutil.rmtree(out)
    assert run(["train", *SMALL, "--out", str(out)]) == 0
    set_aside(out, RUN_ENTRIES)
    (out / "config.yaml").write_text(old_config.replace("seed: 0", "seed: 7"))
    shutil.copytree(out / ASIDE / "checkpoints", out / "checkpoints")
    RunDir(out).claim(force=True)
    assert "seed: 7" in (out / ASIDE / "config.yaml").read_text() and not (out / ASIDE / "model.safetensors").exists()


def test_a_link_planted_as_the_run_set_aside_is_refused_not_followed(tmp_path: Path, capsys):
    """A .replaced-run link in a shared runs folder had the files of the folder it named moved into the
    run by the next --force (and its target emptied)."""
    from ssvi_cli.runs.aside import ASIDE, REMOVING

    out, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    assert run(["train", *SMALL, "--out", str(out)]) == 0
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("mine")
    for name in (ASIDE, REMOVING):
        (out / name).symlink_to(elsewhere)
        assert run(["train", *SMALL, "--out", str(out), "--force"]) == 2
        assert f"{out / name} is a symbolic link, which ssvi does not follow as a run set aside; remove it" in \
            capsys.readouterr().err
        assert (elsewhere / "keep.txt").read_text() == "mine" and not (out / "keep.txt").exists()
        (out / name).unlink()


def test_a_removal_of_the_run_set_aside_cut_short_never_brings_its_files_back(tmp_path: Path, monkeypatch):
    """Removal takes a folder's entries in any order (tmpfs: newest first, the .moved mark first): a kill
    after it had taken the mark left what read as a move cut short, and the next command put the old
    run's model and summary back beside the new run's checkpoint (a "finished" run of the old model)."""
    import shutil
    from ssvi_cli.runs import aside as aside_mod
    from ssvi_cli.runs.aside import ASIDE, MOVED, set_aside
    from ssvi_cli.runs.rundir import RUN_ENTRIES, RunDir

    out = tmp_path / "run"
    assert run(["train", *SMALL, "--out", str(out)]) == 0
    set_aside(out, RUN_ENTRIES)
    (out / "config.yaml").write_text((out / ASIDE / "config.yaml").read_text().replace("seed: 0", "seed: 7"))
    real = shutil.rmtree

    def killed_midway(path, ignore_errors=False):
        path = Path(path)
        for entry in (path / MOVED, *(e for e in path.iterdir() if e.name == "checkpoints")):
            real(entry) if entry.is_dir() else entry.unlink()
        raise KeyboardInterrupt  # stands for the kill: the rest of the folder stays

    monkeypatch.setattr(aside_mod.shutil, "rmtree", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        RunDir(out).save_checkpoint(5, {"state": {"step": 5}}, keep=2)  # the new run's first: the old one goes
    monkeypatch.undo()
    aside_mod.settle_run(RunDir(out), RUN_ENTRIES)  # as the next command over the folder settles it
    assert not (out / "model.safetensors").exists() and not (out / "summary.json").exists()
    assert "seed: 7" in (out / "config.yaml").read_text() and RunDir(out).checkpoints()
    assert [p.name for p in out.iterdir() if p.name.startswith(".") and p.name != ".lock"] == []


def test_the_run_set_aside_goes_at_the_new_runs_first_checkpoint_or_at_a_resume(tmp_path: Path):
    """It stayed for the whole new run (twice the disk), and a --resume after a kill -9 never removed it."""
    from ssvi_cli.runs.aside import ASIDE, set_aside
    from ssvi_cli.runs.rundir import RUN_ENTRIES, RunDir

    out = tmp_path / "run"
    assert run(["train", *SMALL, "--out", str(out)]) == 0
    set_aside(out, RUN_ENTRIES)
    (out / "config.yaml").write_text((out / ASIDE / "config.yaml").read_text())
    RunDir(out).save_checkpoint(5, {"state": {"step": 5}}, keep=2)  # the new run's first
    assert not (out / ASIDE).exists() and (out / "checkpoints").is_dir()
    out2 = tmp_path / "run2"
    assert run(["train", "--epochs", "2", *SMALL[2:], "--out", str(out2)]) == 0
    (out2 / "summary.json").unlink()
    (out2 / "model.safetensors").unlink()
    (out2 / ASIDE).mkdir()  # what a kill -9 of a --force run after its first checkpoint leaves
    (out2 / ASIDE / ".moved").touch()
    (out2 / ASIDE / "config.yaml").write_text("old")
    assert run(["train", "--resume", str(out2)]) == 0
    assert not (out2 / ASIDE).exists()


def test_a_move_cut_short_or_refused_leaves_the_old_run_in_place(tmp_path: Path, monkeypatch):
    """An entry that would not move (a mount point) left the run half moved, and the half left behind
    was then taken for the new run: its config and records were deleted."""
    from ssvi_cli.runs.aside import ASIDE, settle_run
    from ssvi_cli.runs.rundir import RUN_ENTRIES, RunDir

    out = tmp_path / "run"
    assert run(["train", *SMALL, "--out", str(out)]) == 0
    before = sorted(p.name for p in out.iterdir())
    real_rename = Path.rename

    def rename(self, target):
        if self.name == "checkpoints":
            raise OSError(16, "Device or resource busy")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(OSError):
        RunDir(out).claim(force=True)
    monkeypatch.setattr(Path, "rename", real_rename)
    assert sorted(p.name for p in out.iterdir()) == before and not (out / ASIDE).exists()
    # killed between two moves: the entries moved come back, as the run they are part of
    (out / ASIDE).mkdir()
    (out / "config.yaml").rename(out / ASIDE / "config.yaml")
    assert settle_run(RunDir(out), RUN_ENTRIES) is None
    assert sorted(p.name for p in out.iterdir()) == before and RunDir(out).finished()


def test_nproc_force_stopped_before_the_processes_start_puts_the_old_run_back(tmp_path: Path, capsys, monkeypatch):
    from ssvi_cli.runs.aside import ASIDE
    from ssvi_cli.training import launcher

    out = tmp_path / "run"
    assert run(["train", *SMALL, "--out", str(out)]) == 0
    model = (out / "model.safetensors").read_bytes()
    monkeypatch.setattr(launcher, "launch", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    assert run(["train", *SMALL, "--nproc", "2", "--out", str(out), "--force"]) == 130
    assert "is put back" in capsys.readouterr().err
    assert (out / "model.safetensors").read_bytes() == model and not (out / ASIDE).exists()


def test_a_reader_of_a_run_killed_before_its_first_checkpoint_is_told_of_the_run_it_replaced(tmp_path: Path, capsys):
    from ssvi_cli.runs.aside import ASIDE, set_aside
    from ssvi_cli.runs.rundir import RUN_ENTRIES

    out = tmp_path / "run"
    assert run(["train", *SMALL, "--out", str(out)]) == 0
    set_aside(out, RUN_ENTRIES)
    (out / "config.yaml").write_text((out / ASIDE / "config.yaml").read_text())  # then kill -9
    (out / ".lock").touch()
    assert run(["inspect", str(out)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"the run it was replacing is kept in {out / ASIDE}, and ssvi train --out {out} puts it back first" in err
    assert run(["train", *SMALL, "--out", str(out)]) == 2  # puts it back, then refuses: a finished run is there
    assert "already holds a finished run" in capsys.readouterr().err and not (out / ASIDE).exists()


def test_at_80_columns_preset_names_commands_and_paths_stay_whole(tmp_path: Path, capsys, monkeypatch):
    """A pipe, a CI log or a narrow terminal: what a person must copy is never cut."""
    from ssvi_cli import config as C
    from ssvi_cli.cli.common import out as console

    monkeypatch.setattr(console, "_width", 80)
    assert run(["presets"]) == 0
    shown = capsys.readouterr().out
    lines = [line.strip() for line in shown.splitlines()]
    for name, path in C.list_presets().items():
        assert any(f" {name} " in f" {line} " for line in shown.splitlines()), name
        assert C.preset_command(path) in lines, C.preset_command(path)
    assert "…" not in shown
    run_dir = tmp_path / "a-run-directory-whose-name-is-long-enough-to-overflow-a-table-cell"
    assert run(["train", "--out", str(run_dir), "--epochs", "1", "--set", "train.eval_samples=1"]) == 0
    shown = capsys.readouterr().out
    assert f"model file: {run_dir / 'model.safetensors'}" in shown.splitlines()
    assert "…" not in shown
    model = run_dir / "model.safetensors"  # and what to do with it, on a line a person can copy from
    assert (f"next: ssvi evaluate {model} --ood noise | ssvi infer {model} IMAGES | ssvi inspect {model}"
            in shown.splitlines())


def test_a_table_wider_than_a_narrow_terminal_keeps_its_numbers_whole(tmp_path: Path, capsys, monkeypatch):
    """At 40 or 60 columns rich cut the numbers of evaluate's OOD table and inspect's tables ("0.99…",
    "2…") or broke them across lines ("4," over "072"): a table whose words do not fit is printed at its
    own width (the terminal wraps its lines); one that fits is laid out as before; the width is restored."""
    import re

    from rich.table import Table

    from ssvi_cli.cli.common import out as console

    run_dir = tmp_path / "r"
    assert run(["train", "--out", str(run_dir), "--epochs", "1", "--set", "train.eval_samples=1"]) == 0
    capsys.readouterr()
    monkeypatch.setattr(console, "_width", 200)
    assert run(["inspect", str(run_dir)]) == 0
    wide = capsys.readouterr().out
    numbers = set(re.findall(r"\d[\d,.]*\d", wide))
    assert {"32,768", "262,144"} <= numbers
    for width in (40, 60):
        monkeypatch.setattr(console, "_width", width)
        assert run(["inspect", str(run_dir)]) == 0
        narrow = capsys.readouterr().out
        assert "…" not in narrow and numbers <= set(re.findall(r"\d[\d,.]*\d", narrow)), width
        assert run(["evaluate", str(run_dir), "--ood", "noise", "--samples", "2"]) == 0
        assert "…" not in capsys.readouterr().out and console.width == width
    table = Table("key", "value")  # fits: rich's own layout, within the console's width
    table.add_row("a", "words that wrap " * 4)
    console.print(table)
    assert max(len(line) for line in capsys.readouterr().out.splitlines()) <= 60
    monkeypatch.setattr(console, "_width", None)  # a terminal's width, read at each print, stays so
    console.print(table)
    assert console._width is None


def test_train_takes_data_data_dir_and_download_flags_as_evaluate_does(tmp_path: Path, capsys):
    from fixtures_torchvision import write_mnist

    root = tmp_path / "data"
    assert run(["train", "--data", "mnist", "--data-dir", str(root), "--out", str(tmp_path / "no")]) == 2
    err = capsys.readouterr().err
    assert "--download" in err and str(root) in err and len(err.strip().splitlines()) == 1
    write_mnist(root, "MNIST")
    out = tmp_path / "run"
    assert run(["train", "--preset", "mnist_mlp", "--data", "mnist", "--data-dir", str(root), "--no-download",
                "--epochs", "1", "--set", "model.widths=[16]", "--set", "train.eval_samples=1",
                "--out", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["dataset"] == "mnist"
    assert f"data_dir: {root}" in (out / "config.yaml").read_text()
    assert run(["train", "--resume", str(out), "--data-dir", str(root)]) == 2
    assert "drop --data-dir" in capsys.readouterr().err
    # the embedded digits read no data folder: the flags are said to change nothing, not taken silently
    assert run(["train", "--data-dir", str(root), "--download", "--epochs", "1", "--set", "train.eval_samples=1",
                "--out", str(tmp_path / "digits"), "--json"]) == 0
    assert "note: --data-dir and --download are for torchvision datasets; digits reads no data folder" \
        in capsys.readouterr().err


def test_relative_data_paths_are_recorded_absolute_so_the_run_works_from_anywhere(tmp_path: Path, capsys,
                                                                                   monkeypatch):
    from fixtures_torchvision import write_mnist
    from PIL import Image
    from sklearn.datasets import load_digits

    work = (tmp_path / "work").resolve()
    write_mnist(work / "tv", "MNIST")
    digits = load_digits()
    for i in range(40):
        folder = work / "imgs" / str(digits.target[i] % 2)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((digits.images[i] * 15).astype("uint8")).save(folder / f"{i}.png")
    monkeypatch.chdir(work)
    common = ["--epochs", "1", "--set", "model.widths=[16]", "--set", "train.eval_samples=1", "--json"]
    assert run(["train", "--preset", "mnist_mlp", "--data", "mnist", "--data-dir", "tv", "--out", "tvrun",
                *common]) == 0
    assert run(["train", "--data", "imagefolder:imgs", "--set", "data.image_size=8", "--set", "data.channels=1",
                "--out", "imgrun", *common]) == 0
    capsys.readouterr()
    assert f"data_dir: {work / 'tv'}" in (work / "tvrun" / "config.yaml").read_text()
    assert f"name: imagefolder:{work / 'imgs'}" in (work / "imgrun" / "config.yaml").read_text()
    monkeypatch.chdir(tmp_path)  # elsewhere: the run directory, not only the model file, still finds its data
    for name in ("tvrun", "imgrun"):
        assert run(["evaluate", str(work / name), "--samples", "1", "--json"]) == 0, capsys.readouterr().err
        assert 0.0 <= json.loads(capsys.readouterr().out)["metrics"]["accuracy"] <= 1.0
        (work / name / "summary.json").unlink()  # as if stopped after its last checkpoint
        (work / name / "model.safetensors").unlink()
        assert run(["train", "--resume", str(work / name)]) == 0, capsys.readouterr().err
        capsys.readouterr()


def test_a_run_in_progress_is_never_written_by_a_second_process(tmp_path: Path, capsys):
    """While a process trains a run (it holds the run's lock), --force over it and a second --resume
    are refused in a line and change nothing; an --out that cannot be made is refused in a line too."""
    from ssvi_cli.runs.rundir import RunDir

    live = tmp_path / "live"
    assert run(["train", "--epochs", "1", "--set", "train.eval_samples=1", "--out", str(live)]) == 0
    (live / "summary.json").unlink()  # as if stopped after its last checkpoint
    (live / "model.safetensors").unlink()
    before = sorted(p.name for p in live.rglob("*"))
    capsys.readouterr()
    with RunDir(live).hold():  # as the process training it does
        for args in (["--resume", str(live)], ["--out", str(live), "--force", "--epochs", "1"]):
            assert run(["train", *args]) == 2
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and f"{live}: the run is in use by another ssvi process (process " in err
        # without --force: said to be in use, not "pass --force or --resume", which would be refused too
        assert run(["train", "--out", str(live), "--epochs", "1"]) == 2
        err = capsys.readouterr().err
        assert "in use by another ssvi process" in err and "--force" not in err, err
    assert sorted(p.name for p in live.rglob("*")) == before
    assert run(["train", "--resume", str(live)]) == 0  # the lock went with its holder
    (tmp_path / "afile").write_text("x")
    capsys.readouterr()
    assert run(["train", "--epochs", "1", "--out", str(tmp_path / "afile" / "sub")]) == 2
    assert capsys.readouterr().err == f"error: --out: {tmp_path / 'afile'} is a file, not a folder\n"


def test_runs_started_in_the_same_second_get_a_folder_each(tmp_path: Path, capsys, monkeypatch):
    """Two runs with the default --out started in one second (a loop of background jobs) shared one
    folder: all but one were refused. A default name taken, by a finished run or one in progress,
    moves on to NAME-2, NAME-3."""
    import time

    from ssvi_cli.runs.rundir import RunDir

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(time, "strftime", lambda fmt, *a: "20260101-000000")
    name = tmp_path / "runs" / "20260101-000000-digits_mlp-ssvi-s0.95"
    small = ["--epochs", "1", "--set", "model.widths=[8]", "--set", "data.max_train=64", "--set", "train.eval_samples=1"]
    name.mkdir(parents=True)
    with RunDir(name).hold():  # another process has just claimed it
        assert run(["train", *small, "--json"]) == 0
    assert run(["train", *small, "--seed", "1", "--json"]) == 0
    capsys.readouterr()
    assert sorted(p.name for p in name.parent.iterdir()) == [name.name, f"{name.name}-2", f"{name.name}-3"]
    assert RunDir(name.with_name(f"{name.name}-3")).read_config().train.seed == 1
    assert not (name / "config.yaml").exists()  # the folder another run holds is left alone


def test_a_preset_with_a_long_name_gives_a_default_folder_the_system_takes(tmp_path: Path, capsys, monkeypatch):
    """A preset file of a 245-character name made the default run folder's name longer than the 255
    bytes a file system allows, and the run was refused: the name keeps the preset's first 48
    characters (UTF-8 of up to 4 bytes each); so does a sweep's default folder."""
    import time

    from ssvi_cli.runs.rundir import RunDir

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(time, "strftime", lambda fmt, *a: "20260101-000000")
    preset = Path("p" * 240 + "ü.yaml")
    preset.write_text("train: {epochs: 1, eval_samples: 1}\nmodel: {widths: [8]}\ndata: {max_train: 64}\n")
    assert run(["train", "--preset", str(preset), "--json"]) == 0
    (made,) = Path("runs").iterdir()
    assert made.name == f"20260101-000000-{'p' * 48}-ssvi-s0.9" and (made / "model.safetensors").is_file()
    assert RunDir.default("ü" * 60, "vi", None).path.name == f"20260101-000000-{'ü' * 48}-vi"
    assert run(["sweep", "--preset", str(preset), "--dry-run"]) == 0
    capsys.readouterr()
    assert [p.name for p in Path("sweeps").iterdir()] == [f"20260101-000000-{'p' * 48}"]


def test_a_key_the_method_cannot_use_is_said(tmp_path: Path, capsys):
    """rigl --criterion snr and vi --sparsity 0.9 trained as if the flag had not been given, silently."""
    small = ["--epochs", "1", "--set", "model.widths=[8]", "--set", "data.max_train=64", "--set", "train.eval_samples=1"]
    cases = ((["--method", "rigl", "--criterion", "snr"], "note: rigl does not use --criterion, so it changes nothing"),
             (["--method", "vi", "--sparsity", "0.9", "--set", "sparse.alpha=0.5"],
              "note: vi does not use --set sparse.alpha, --sparsity, so they change nothing"),
             (["--method", "ssvi", "--criterion", "snr"], None),
             # the model's and the data's keys that change nothing for this model and data, with why
             (["--set", "data.augment=false", "--set", "model.dense_stem=false", "--set", "optim.momentum=0.5"],
              "note: --set data.augment changes nothing here (digits has no augmentation)\n"
              "note: --set model.dense_stem changes nothing here (mlp has no first conv)\n"
              "note: --set optim.momentum changes nothing here (adam takes no momentum)\n"),
             (["--method", "vi", "--set", "model.dense_stem=false"],  # said once, as the method's
              "note: vi does not use --set model.dense_stem, so it changes nothing here\n"))
    for i, (args, note) in enumerate(cases):
        assert run(["train", *args, *small, "--out", str(tmp_path / f"r{i}")]) == 0
        said = capsys.readouterr().err
        assert (note in said) if note else ("does not use" not in said and "changes nothing" not in said), said
        assert "mlp has no first conv" not in said or "vi" not in args, said


def test_print_config_shows_what_a_command_would_train_with_and_trains_nothing(tmp_path: Path, capsys, monkeypatch):
    """The resolved config after the preset, the flags and --set could be seen only in a run's folder once
    it had started; --print-config prints it (YAML that --preset reads back, or JSON) and exits."""
    import yaml

    from ssvi_cli import config as C
    from ssvi_cli.cli.train_config import build_config

    monkeypatch.chdir(tmp_path)
    args = ["--method", "vi", "--epochs", "3", "--set", "optim.lr=0.02", "--set", "data.augment=false"]
    assert run(["train", *args, "--out", str(tmp_path / "r"), "--print-config"]) == 0
    text = capsys.readouterr().out
    expected = build_config(None, {"sparse.method": "vi", "train.epochs": 3}, ["optim.lr=0.02", "data.augment=false"])
    assert text.startswith("# this command trains with these values") and C.from_dict(yaml.safe_load(text)) == expected
    assert "augment: false  # not used: digits has no augmentation" in text and "sparsity: 0.95  # not used" in text
    assert not (tmp_path / "r").exists() and not (tmp_path / "runs").exists()  # nothing written
    assert run(["train", *args, "--print-config", "--json"]) == 0
    printed = capsys.readouterr().out
    assert C.from_dict(json.loads(printed)) == expected
    (tmp_path / "mine.json").write_text(printed)  # and --preset reads the JSON back, as the YAML
    assert run(["train", "--preset", "mine.json", "--print-config", "--json"]) == 0
    assert C.from_dict(json.loads(capsys.readouterr().out)) == expected
    assert run(["train", "--epochs", "1", "--set", "model.widths=[8]", "--set", "data.max_train=64", "--set",
                "train.eval_samples=1", "--out", str(tmp_path / "done")]) == 0
    capsys.readouterr()
    assert run(["train", "--resume", str(tmp_path / "done"), "--print-config"]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"# the run {tmp_path / 'done'} goes on with these values (its saved config)")
    assert C.from_dict(yaml.safe_load(text)).model.widths == (8,)
    assert run(["train", "--resume", str(tmp_path / "none"), "--print-config"]) == 2
    said = capsys.readouterr().err
    assert "no run config to print there" in said and len(said.strip().splitlines()) == 1
    # a config train would refuse is refused here too (it printed, exit code 0), and noted as train notes it
    for bad, error in ((["--model", "bogus"], "unknown model 'bogus'"), (["--criterion", "bogus"], "unknown criterion"),
                       (["--model", "lenet5"], "lenet5 needs inputs of at least 12x12, got 8x8"),
                       (["--set", "data.mean=[0.5]"], "data.mean=[0.5] applies to image folders"),
                       # at its default value too, as train refuses it (--print-config printed it)
                       (["--set", "data.image_size=32"], "data.image_size=32 applies to image folders")):
        assert run(["train", *bad, "--print-config"]) == 2
        captured = capsys.readouterr()
        assert captured.out == "" and captured.err.startswith("error: ") and error in captured.err, captured.err
    (tmp_path / "min.yaml").write_text("train: {seed: 0}\n")
    assert run(["train", "--preset", "min.yaml", "--print-config"]) == 0
    assert "note: min.yaml does not set optim.name, bayes.prior_sigma, train.epochs" in capsys.readouterr().err


def test_train_takes_the_presets_values_for_the_chosen_method(tmp_path: Path, capsys):
    import yaml

    from ssvi_cli.config import OptimConfig

    preset = tmp_path / "mine.yaml"
    preset.write_text("model: {name: mlp, widths: [16]}\ntrain: {epochs: 1, eval_samples: 2}\n"
                      "methods:\n  vi: {optim: {lr: 0.0123}}\n")
    for method, lr in (("vi", 0.0123), ("ssvi", OptimConfig().lr)):
        out = tmp_path / method
        assert run(["train", "--preset", str(preset), "--method", method, "--out", str(out)]) == 0, capsys.readouterr().err
        saved = yaml.safe_load((out / "config.yaml").read_text())
        assert (saved["sparse"]["method"], saved["optim"]["lr"]) == (method, lr)


def test_resume_passes_over_an_unreadable_newest_checkpoint_for_the_one_before(tmp_path: Path, capsys, caplog):
    out = tmp_path / "r"
    tiny = ["--epochs", "2", "--set", "model.widths=[8]", "--set", "data.max_train=64", "--set", "train.eval_samples=1"]
    assert run(["train", "--out", str(out), *tiny]) == 0
    older, newest = sorted((out / "checkpoints").glob("checkpoint-*.pt"))
    (out / "summary.json").unlink()  # as if stopped after its last checkpoint
    (out / "model.safetensors").unlink()
    newest.write_bytes(newest.read_bytes()[:100])  # a cut copy
    capsys.readouterr()
    assert run(["train", "--resume", str(out), "--json"]) == 0
    assert f"resuming from {older.name}, the one before it" in caplog.text and "is unreadable or corrupted" in caplog.text
    assert "resuming" in capsys.readouterr().err and (out / "model.safetensors").is_file()
    assert newest.stat().st_size > 100  # the resumed run wrote that step's checkpoint again
    (out / "summary.json").unlink()
    for path in sorted((out / "checkpoints").glob("checkpoint-*.pt")):
        path.write_bytes(b"not a checkpoint")
    capsys.readouterr()
    assert run(["train", "--resume", str(out)]) == 2  # none reads: the newest one's error, naming the others
    said = capsys.readouterr().err
    assert f"checkpoint {newest} is unreadable or corrupted" in said
    assert f"the older {older.name} does not read either" in said and len(said.strip().splitlines()) == 1


def test_resume_sets_an_unreadable_checkpoint_aside_so_pruning_keeps_the_one_it_resumed_from(tmp_path: Path, capsys):
    """An unreadable checkpoint at a step the resumed run never writes again (one of an interrupt,
    mid-epoch) is no longer counted by keep_checkpoints, which used to prune the good one instead."""
    out = tmp_path / "r"
    tiny = ["--epochs", "3", "--set", "model.widths=[8]", "--set", "data.max_train=64", "--set", "train.eval_samples=1"]
    assert run(["train", "--out", str(out), *tiny, "--batch-size", "16", "--set", "train.keep_checkpoints=2"]) == 0
    good, last = sorted((out / "checkpoints").glob("checkpoint-*.pt"))
    (out / "summary.json").unlink()
    (out / "model.safetensors").unlink()
    cut = good.with_name(f"checkpoint-{int(good.stem.split('-')[1]) + 1:08d}.pt")  # as an interrupt names it
    last.rename(cut)
    cut.write_bytes(cut.read_bytes()[:100])
    capsys.readouterr()
    assert run(["train", "--resume", str(out), "--json"]) == 0
    assert f"is renamed {cut}.unreadable" in capsys.readouterr().err
    assert sorted((out / "checkpoints").glob("checkpoint-*")) == [good, cut.with_name(cut.name + ".unreadable"), last]


def test_evaluate_and_inspect_of_a_run_pass_over_an_unreadable_newest_checkpoint(tmp_path: Path, capsys, caplog):
    out = tmp_path / "r"
    tiny = ["--epochs", "2", "--set", "model.widths=[8]", "--set", "data.max_train=64", "--set", "train.eval_samples=1"]
    assert run(["train", "--out", str(out), *tiny]) == 0
    older, newest = sorted((out / "checkpoints").glob("checkpoint-*.pt"))
    (out / "model.safetensors").unlink()  # a run stopped before it wrote its model file
    newest.write_bytes(newest.read_bytes()[:100])
    for command in (["evaluate", str(out), "--samples", "2", "--json"], ["inspect", str(out), "--json"]):
        caplog.clear()
        capsys.readouterr()
        assert run(command) == 0, capsys.readouterr().err
        assert f"reading {older.name}, the one before it" in caplog.text
        report = json.loads(capsys.readouterr().out)
        assert report["file"] == str(older) if command[0] == "inspect" else 0 < report["metrics"]["accuracy"] <= 1
        assert newest.stat().st_size == 100  # nothing written: reading leaves the run as it was


@pytest.mark.parametrize("content", [b"hello", b"\x80\x02}q\x00."])
def test_a_checkpoint_of_stray_bytes_is_unreadable_not_a_crash(tmp_path: Path, capsys, content):
    """'hello' sends torch's weights-only unpickler to a KeyError (101): one line, exit 2."""
    path = tmp_path / "x.pt"
    path.write_bytes(content)
    for command in (["inspect", str(path)], ["evaluate", str(path), "--samples", "1"]):
        capsys.readouterr()
        assert run(command) == 2
        err = capsys.readouterr().err
        assert f"checkpoint {path} is unreadable or corrupted" in err or "is not an ssvi checkpoint" in err, err


def test_an_earlier_or_copied_checkpoint_does_not_take_the_runs_final_numbers(tmp_path: Path, capsys):
    out = tmp_path / "r"
    tiny = ["--epochs", "2", "--set", "model.widths=[8]", "--set", "data.max_train=64", "--set", "train.eval_samples=1"]
    assert run(["train", "--out", str(out), *tiny]) == 0
    earlier, final = sorted((out / "checkpoints").glob("checkpoint-*.pt"))
    other_run = tmp_path / "seed1"  # the same grid cell but for its seed: the same number of steps
    assert run(["train", "--out", str(other_run), *tiny, "--seed", "1"]) == 0
    elsewhere = other_run / "checkpoints" / f"copied-{final.name}"
    elsewhere.write_bytes(final.read_bytes())

    def metrics(path: Path) -> dict:
        capsys.readouterr()
        assert run(["inspect", str(path), "--json"]) == 0
        return json.loads(capsys.readouterr().out)["metrics"]

    assert metrics(final)["test_accuracy"] == json.loads((out / "summary.json").read_text())["test_accuracy"]
    assert metrics(earlier) == {} and metrics(elsewhere) == {}
    assert run(["export", str(earlier), "-o", str(tmp_path / "e.safetensors")]) == 0
    assert metrics(tmp_path / "e.safetensors") == {}


def test_a_torchrun_worker_keeps_its_signals_to_its_launcher(monkeypatch):
    """Every rank printed its own 'stopped by SIGTERM' (one line per run is rank 0's), and a rank
    blocked in a collective outside training no longer died at its launcher's SIGTERM."""
    import importlib
    import signal

    app_module = importlib.import_module("ssvi_cli.cli.app")
    before = signal.getsignal(signal.SIGTERM)
    with app_module._unwinding():
        assert signal.getsignal(signal.SIGTERM) is not before  # a command outside torchrun unwinds
    for key, value in (("RANK", "1"), ("LOCAL_RANK", "1"), ("WORLD_SIZE", "2")):
        monkeypatch.setenv(key, value)
    with app_module._unwinding():
        assert signal.getsignal(signal.SIGTERM) is before
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.mark.parametrize("stop, code", [("terminated", 129), ("ctrl-c", 130)])
def test_a_stop_that_cleaning_up_turned_into_another_error_keeps_its_exit_code(monkeypatch, capsys, stop, code):
    """SIGHUP from a closed terminal while a progress bar shows: the bar's exit writes to the dead
    terminal, and its OSError (EIO) replaced the stop, which then read as a failure, exit 1."""
    import importlib

    app_module = importlib.import_module("ssvi_cli.cli.app")
    import signal

    def stopped(*args, **kwargs):
        try:
            raise app_module.Terminated(signal.SIGHUP) if stop == "terminated" else KeyboardInterrupt()
        except BaseException:
            raise OSError(5, "Input/output error")

    monkeypatch.setattr(app_module, "app", stopped)
    assert app_module.run(["evaluate"]) == code
    assert ("stopped by SIGHUP" if stop == "terminated" else "interrupted") in capsys.readouterr().err


@pytest.mark.parametrize("raised, code", [("handled", 143), ("ctrl-c", 130)])
def test_a_stop_keeps_its_exit_code_when_stderr_has_gone(raised, code):
    """'ssvi train ... 2>&1 | tee log' and Ctrl-C: tee is gone when the last line is printed. rich
    answers the broken pipe with SystemExit(1), which turned exit 130 into 1. The real console, in a
    process of its own whose stderr is a pipe with no reader."""
    stop = ('KeyboardInterruptHandled("stopped by SIGTERM at step 3; checkpoint written", 143, "ssvi train --resume r")'
            if raised == "handled" else "KeyboardInterrupt()")
    child = f"""
import importlib, os
from ssvi_cli.cli.train_fit import KeyboardInterruptHandled
app_module = importlib.import_module("ssvi_cli.cli.app")
def stopped(*args, **kwargs):
    raise {stop}
app_module.app = stopped
read, write = os.pipe()
os.close(read)
os.dup2(write, 2)
os._exit(app_module.run(["train"]))
"""
    assert subprocess.run([sys.executable, "-c", child], timeout=120).returncode == code


@pytest.mark.parametrize("record", ["summary.json", "config.yaml"])
def test_an_output_file_is_never_one_of_the_runs_own_records(tmp_path: Path, capsys, record):
    """evaluate --output RUN/summary.json replaced the run's summary with a report, without a word."""
    out = tmp_path / "r"
    assert run(["train", "--out", str(out), "--epochs", "1", "--set", "model.widths=[8]", "--set",
                "data.max_train=64", "--set", "train.eval_samples=1"]) == 0
    kept = (out / record).read_bytes()
    capsys.readouterr()
    assert run(["evaluate", str(out), "--samples", "1", "--output", str(out / record)]) == 2
    assert f"is a record of the run in {out}" in capsys.readouterr().err
    assert (out / record).read_bytes() == kept
    assert run(["evaluate", str(out), "--samples", "1", "--output", str(out / "evaluation.json")]) == 0


def _keeps_case(folder: Path) -> bool:
    """Whether the disk under ``folder`` tells names apart by case (Linux's does; macOS's does not)."""
    probe = folder / "case-probe"
    probe.touch()
    try:
        return not (folder / "CASE-PROBE").exists()
    finally:
        probe.unlink()


def test_outputs_never_land_among_a_sweeps_files_or_a_runs_checkpoints(tmp_path: Path, capsys):
    """evaluate --output SWEEP/sweep.json replaced the sweep's grid with a report; --plots wrote into a
    run's checkpoints folder or a sweep's cells folder; train --out made a run inside another's
    checkpoints folder."""
    out, sweep = tmp_path / "r", tmp_path / "s"
    assert run(["train", "--out", str(out), "--epochs", "1", "--set", "model.widths=[8]", "--set",
                "data.max_train=64", "--set", "train.eval_samples=1"]) == 0
    assert run(["sweep", "--method", "ssvi", "--sparsity", "0.9", "--out", str(sweep), "--dry-run"]) == 0
    (sweep / "cells").mkdir()
    (sweep / "report.json").write_text("{}")
    grid = (sweep / "sweep.json").read_bytes()
    capsys.readouterr()
    keeps_case = _keeps_case(tmp_path)
    if keeps_case:  # one file under two cases, as on a disk that ignores case (where it is so already)
        (sweep / "Sweep.JSON").symlink_to("sweep.json")
    for name in ("sweep.json", "report.json", "Sweep.JSON", "cells/x.json"):
        assert run(["evaluate", str(out), "--samples", "1", "--output", str(sweep / name)]) == 2, name
        said = capsys.readouterr().err
        assert f"the sweep in {sweep}" in said and len(said.strip().splitlines()) == 1, said
    if keeps_case:  # where case is kept, Sweep.JSON is another file, Checkpoints another folder
        (sweep / "Sweep.JSON").unlink()
        assert run(["evaluate", str(out), "--samples", "1", "--output", str(sweep / "Sweep.JSON")]) == 0
        assert run(["evaluate", str(out), "--samples", "1", "--plots", str(out / "Checkpoints")]) == 0
        assert (out / "Checkpoints" / "reliability.png").is_file() and not list((out / "checkpoints").glob("*.png"))
        capsys.readouterr()
    assert (sweep / "sweep.json").read_bytes() == grid and (sweep / "report.json").read_text() == "{}"
    for command in (["evaluate", str(out), "--samples", "1"], ["inspect", str(out)]):
        for folder, words in ((out / "checkpoints", "the checkpoints folder of the run"), (sweep / "cells", "the cells folder of the sweep")):
            assert run([*command, "--plots", str(folder)]) == 2, (command, folder)
            assert words in capsys.readouterr().err
    assert not list((out / "checkpoints").glob("*.png")) and not list((sweep / "cells").iterdir())
    nested = out / "checkpoints" / "sub"  # below it: a run's --force would remove it with its checkpoints
    assert run(["evaluate", str(out), "--samples", "1", "--plots", str(nested)]) == 2
    assert "is in the checkpoints folder of the run" in capsys.readouterr().err
    assert run(["train", "--out", str(nested), "--epochs", "1", "--set", "data.max_train=64"]) == 2
    assert f"is inside the checkpoints folder of the run in {out}" in capsys.readouterr().err
    assert not nested.exists()
    project = tmp_path / "project"  # a preset kept as config.yaml is no run: its checkpoints/ is the user's
    project.mkdir()
    (project / "config.yaml").write_text((out / "config.yaml").read_text())
    assert run(["train", "--out", str(project / "checkpoints" / "a"), "--epochs", "1", "--set", "model.widths=[8]",
                "--set", "data.max_train=64", "--set", "train.eval_samples=1"]) == 0
    capsys.readouterr()  # and --force does not take the project for a run to replace, with its checkpoints/
    assert run(["train", "--out", str(project), "--force", "--epochs", "1", "--set", "data.max_train=64"]) == 2
    assert "holds a config.yaml but no run trained there" in capsys.readouterr().err
    assert run(["train", "--resume", str(project)]) == 2
    assert "no run trained there, so there is nothing to read or resume" in capsys.readouterr().err
    assert (project / "checkpoints" / "a" / "model.safetensors").is_file() and (project / "config.yaml").is_file()
    assert run(["evaluate", str(out), "--samples", "1", "--plots", str(out)]) == 0  # beside the run's files: its own
    assert (out / "reliability.png").is_file()


def test_nothing_lands_below_a_sweeps_cells_or_logs_but_its_own_cells(tmp_path: Path, capsys):
    """--plots SWEEP/logs/pl, --plots SWEEP/cells/CELL, --output SWEEP/logs/sub/x.json and train --out
    SWEEP/cells/mine were accepted: the guard looked one folder deep, and the sweep's --force removes
    cells/ and logs/ with everything in them. The sweep's own cells still train and evaluate there."""
    out, sweep = tmp_path / "r", tmp_path / "s"
    small = ["--set", "model.widths=[8]", "--set", "data.max_train=64", "--set", "train.eval_samples=1"]
    assert run(["train", "--out", str(out), "--epochs", "1", *small]) == 0
    assert run(["sweep", "--method", "ssvi", "--sparsity", "0.9", "--out", str(sweep), "--samples", "1",
                "--set", "train.epochs=1", *small]) == 0
    cell = sweep / "cells" / "ssvi_s0.9_seed0"
    (sweep / "logs" / "sub").mkdir()
    capsys.readouterr()
    before = sorted(p.relative_to(sweep) for p in sweep.rglob("*"))
    for args, words in ((["--plots", str(sweep / "logs" / "pl")], "is in the logs folder of the sweep"),
                        (["--plots", str(cell)], "is in the cells folder of the sweep"),
                        (["--plots", str(sweep / "cells" / "pl")], "is in the cells folder of the sweep"),
                        (["--output", str(sweep / "logs" / "sub" / "x.json")], "is in the logs folder of the sweep"),
                        (["--output", str(cell / "mine.json")], "is in the cells folder of the sweep")):
        assert run(["evaluate", str(out), "--samples", "1", *args]) == 2, args
        said = capsys.readouterr().err
        assert words in said and f"of the sweep in {sweep}" in said and len(said.strip().splitlines()) == 1, said
    for target in (sweep / "cells" / "mine", cell / "sub"):
        assert run(["train", "--out", str(target), "--epochs", "1", *small]) == 2, target
        assert "is in the cells folder of the sweep" in capsys.readouterr().err
    assert run(["train", "--out", str(cell), "--force", "--epochs", "1", *small]) == 2
    assert "is in the cells folder of the sweep" in capsys.readouterr().err
    assert sorted(p.relative_to(sweep) for p in sweep.rglob("*")) == before
    (cell / "evaluation.json").unlink()  # the sweep's own run of the cell evaluates it again, in the cell
    assert run(["sweep", "--run-cell", str(cell), "--json"]) == 0 and (cell / "evaluation.json").is_file()


def test_a_report_never_replaces_another_runs_model_file(tmp_path: Path, capsys):
    """evaluate --output OTHER_RUN/model.safetensors wrote its JSON report over that run's model file."""
    import numpy as np

    tiny = ["--epochs", "1", "--set", "model.widths=[8]", "--set", "data.max_train=64", "--set", "train.eval_samples=1"]
    first, other = tmp_path / "a", tmp_path / "b"
    for out in (first, other):
        assert run(["train", "--out", str(out), *tiny]) == 0
    kept = (other / "model.safetensors").read_bytes()
    np.save(tmp_path / "x.npy", np.zeros((8, 8), np.uint8))
    capsys.readouterr()
    assert run(["evaluate", str(first), "--samples", "1", "--output", str(other / "model.safetensors")]) == 2
    said = capsys.readouterr().err
    assert f"is the model file of the run in {other}" in said and len(said.strip().splitlines()) == 1
    assert run(["infer", str(first), str(tmp_path / "x.npy"), "--output", str(other / "model.safetensors")]) == 2
    assert "must end in .jsonl or .csv" in capsys.readouterr().err  # infer names its outputs by their kind
    if _keeps_case(tmp_path):  # one file under two cases, as on macOS's disk (where it is so already)
        (other / "MODEL.safetensors").symlink_to("model.safetensors")
    assert run(["evaluate", str(first), "--samples", "1", "--output", str(other / "MODEL.safetensors")]) == 2
    assert "is the model file of the run" in capsys.readouterr().err
    if _keeps_case(tmp_path):
        (other / "MODEL.safetensors").unlink()
    assert (other / "model.safetensors").read_bytes() == kept
    checkpoint = sorted((other / "checkpoints").glob("*.pt"))[-1]
    for target, words in ((checkpoint, "is in the checkpoints folder of the run"), (other / ".lock", "is the lock of the run")):
        before = target.read_bytes()
        assert run(["evaluate", str(first), "--samples", "1", "--output", str(target)]) == 2
        assert words in capsys.readouterr().err
        assert target.read_bytes() == before
    kept = checkpoint.read_bytes()
    (tmp_path / "ck").symlink_to(other / "checkpoints")  # the same folder reached another way
    assert run(["evaluate", str(first), "--samples", "1", "--output", str(tmp_path / "ck" / checkpoint.name)]) == 2
    assert "is in the checkpoints folder of the run" in capsys.readouterr().err
    assert checkpoint.read_bytes() == kept
    array = tmp_path / "x.npy"  # an input of the user's: a report is only ever *.json
    kept = array.read_bytes()
    assert run(["evaluate", str(first), "--samples", "1", "--output", str(array)]) == 2
    assert "name the report *.json" in capsys.readouterr().err and array.read_bytes() == kept


def test_a_checkpoint_gone_since_listed_is_passed_over_and_a_system_error_is_not(tmp_path: Path, monkeypatch):
    """Under torchrun rank 0 renames an unreadable checkpoint while another rank may be about to read
    it; a read the system refused (no permission) may be of a whole file: it stops the resume rather
    than falling back to an older checkpoint, which would lose progress."""
    import errno

    from ssvi_cli.runs import checkpoint as ckpt
    from ssvi_cli.runs.rundir import RunDir

    out = tmp_path / "r"
    assert run(["train", "--out", str(out), "--epochs", "2", "--set", "model.widths=[8]", "--set",
                "data.max_train=64", "--set", "train.eval_samples=1"]) == 0
    older, newest = sorted((out / "checkpoints").glob("checkpoint-*.pt"))
    real = ckpt.torch_load_tensors

    def renamed_meanwhile(path, **kwargs):
        if Path(path) == newest:
            newest.rename(newest.with_name(newest.name + ".unreadable"))
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(path))
        return real(path, **kwargs)

    monkeypatch.setattr(ckpt, "torch_load_tensors", renamed_meanwhile)
    assert RunDir(out).load_latest()[0] == older
    monkeypatch.setattr(ckpt, "torch_load_tensors",
                        lambda path, **kwargs: (_ for _ in ()).throw(PermissionError(errno.EACCES, "Permission denied")))
    with pytest.raises(ckpt.CheckpointError) as caught:
        RunDir(out).load_latest()
    assert not isinstance(caught.value, ckpt.CorruptCheckpoint) and "cannot read checkpoint" in str(caught.value)


def test_a_run_stopped_before_its_first_checkpoint_is_named_as_one_by_every_reader(tmp_path: Path, capsys):
    """--resume, evaluate, inspect and export asked whether it was a run directory at all."""
    out = tmp_path / "r"
    assert run(["train", "--out", str(out), "--epochs", "1", "--set", "model.widths=[8]", "--set",
                "data.max_train=64", "--set", "train.eval_samples=1"]) == 0
    for path in [*(out / "checkpoints").iterdir(), out / "model.safetensors", out / "summary.json"]:
        path.unlink()  # as a kill -9 before the first checkpoint leaves it
    capsys.readouterr()
    for argv in (["train", "--resume", str(out)], ["evaluate", str(out)], ["inspect", str(out)],
                 ["export", str(out), "-o", str(tmp_path / "m.safetensors")]):
        assert run(argv) == 2
        said = capsys.readouterr().err
        assert "stopped before its first checkpoint" in said and f"--out {out} --force" in said, said
        assert len(said.strip().splitlines()) == 1


def test_a_run_stopped_before_it_wrote_anything_is_named_as_one(tmp_path: Path, capsys):
    """Ctrl-C while a run was set up (its folder claimed, its lock alone written): --resume asked "is it
    a run directory written by 'ssvi train'?", and the folder takes the same --out again."""
    out = tmp_path / "r"
    out.mkdir()
    (out / ".lock").write_text("12345")  # as the interrupted run left it
    for argv in (["train", "--resume", str(out)], ["evaluate", str(out)], ["inspect", str(out)]):
        assert run(argv) == 2
        said = capsys.readouterr().err
        assert f"{out} holds no run: one was stopped there before it began, so there is nothing to read or resume; " \
               f"train with --out {out} again (only its lock is left)" in " ".join(said.split()), said
    from ssvi_cli.locks import acquire_lock

    with acquire_lock(out / ".lock", "the run's lock"):  # a run starting there now, before its first checkpoint
        for argv in (["evaluate", str(out)], ["inspect", str(out)]):
            assert run(argv) == 2
            said = " ".join(capsys.readouterr().err.split())
            assert f"{out} holds a run that is starting (process {os.getpid()}): nothing to read or resume until its " \
                   "first checkpoint" in said, said
    (out / ".replaced-run").mkdir()  # a --force run killed before its first checkpoint: the old run set aside
    assert run(["evaluate", str(out)]) == 2
    said = " ".join(capsys.readouterr().err.split())
    assert f"the run it was replacing is kept in {out / '.replaced-run'}" in said and "only its lock" not in said, said
    (out / ".replaced-run").rmdir()
    assert run(["train", "--out", str(out), "--epochs", "1", "--set", "model.widths=[8]", "--set", "data.max_train=64",
                "--set", "train.eval_samples=1"]) == 0


def test_a_finished_run_whose_checkpoints_are_gone_is_not_called_stopped(tmp_path: Path, capsys):
    """Its summary says it reached its end: "stopped before its first checkpoint" was wrong, and the
    --force it advised replaces those records."""
    out = tmp_path / "r"
    assert run(["train", "--out", str(out), "--epochs", "1", "--set", "model.widths=[8]", "--set",
                "data.max_train=64", "--set", "train.eval_samples=1"]) == 0
    for path in [*(out / "checkpoints").iterdir(), out / "model.safetensors"]:
        path.unlink()
    capsys.readouterr()
    for argv in (["train", "--resume", str(out)], ["evaluate", str(out)], ["inspect", str(out)]):
        assert run(argv) == 2
        said = capsys.readouterr().err
        assert "whose checkpoints and model file are gone" in said and "stopped before" not in said, said
        assert "replacing those records" in said and len(said.strip().splitlines()) == 1


def test_threads_are_recorded_and_a_resume_on_others_is_said(tmp_path, capsys):
    """A CPU run's numbers move in their last digits with the thread count (a sweep's --jobs sets it),
    which nothing recorded: each epoch record and the summary hold it, and a resume on another count
    says so."""
    import json

    import torch

    from ssvi_cli.cli import run

    out = tmp_path / "run"
    assert run(["train", "--out", str(out), "--epochs", "2", "--set", "model.widths=[8]", "--set",
                "data.max_train=64", "--set", "train.eval_samples=1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["threads"] == torch.get_num_threads()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["threads"] for r in records] == [torch.get_num_threads()] * 2
    (out / "summary.json").unlink()
    (out / "model.safetensors").unlink()
    records[-1]["threads"] = torch.get_num_threads() + 3  # as if it had trained under another --threads
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert run(["train", "--resume", str(out)]) == 0
    assert (f"note: the run trained on {torch.get_num_threads() + 3} CPU threads so far and goes on with "
            f"{torch.get_num_threads()}") in capsys.readouterr().err


def test_a_run_resumed_on_another_number_of_processes_says_so(monkeypatch):
    """The --nproc 2 run's resume hint had no --nproc: taken as given, the run went on on one process
    and nothing said the count had changed."""
    from ssvi_cli.cli.train_config import processes_note

    assert processes_note(128, 64, 1) == "note: the run started on 2 processes and goes on with 1; its global batch stays 128"
    assert processes_note(64, 64, 2) == "note: the run started on 1 process and goes on with 2; its global batch stays 64"
    assert processes_note(128, 64, 2) == ""
    from ssvi_cli.cli.train_config import nproc_again
    from ssvi_cli.training.launcher import PARENT_ENV

    monkeypatch.setenv(PARENT_ENV, "123")  # started by ssvi train --nproc
    assert nproc_again(2) == " --nproc 2" and nproc_again(1) == ""
    monkeypatch.delenv(PARENT_ENV)  # by torchrun itself over several nodes: started again as it was
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert nproc_again(8) == ""
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # on one node: --nproc starts it alike (it said nothing)
    assert nproc_again(2) == " --nproc 2"


def test_commands_that_need_no_model_start_without_importing_torch():
    """ssvi --version, presets and --help answer in a fraction of a second: torch (about 2 s to import)
    is imported only by the commands that use it."""
    code = ("import sys; from ssvi_cli.cli import run; "
            "assert run(['presets']) == 0 and run(['--version']) == 0; print('torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "False", proc.stdout[-500:]


@pytest.mark.parametrize("words, cword, expected", [
    ("ssvi tr", 1, ["train"]),
    ("ssvi train --preset mnist_", 3, ["mnist_lenet5", "mnist_mlp"]),
    ("ssvi sweep --method ssvi,r", 3, ["ssvi,rigl"]),
    ("ssvi evaluate model.safetensors --ood s", 4, ["sklearn-photos", "svhn"]),
    ("ssvi export runs/x --dtype b", 4, ["bfloat16"]),
    ("ssvi train --preset ./my", 3, []),  # a path: the shell's own file names
    ("ssvi presets dig", 2, ["digits_mlp"]),
    ("ssvi --debug train --method r", 4, ["rigl"]),  # --debug goes anywhere
    ("ssvi sweep --method ssvi,", 3, ["ssvi,vi", "ssvi,static", "ssvi,rigl", "ssvi,dense"]),  # not ssvi again
    ("ssvi train --data cifar", 3, ["cifar10", "cifar100"]),
    ("ssvi train --epochs 1 --epochs 2 --preset d", 7, ["digits_mlp"]),  # the twice-given refusal waits for Enter
    ("ssvi --version tr", 2, ["train"]),  # the version line is not a completion
])
def test_tab_completes_commands_flags_and_their_values_without_importing_torch(words, cword, expected):
    """`ssvi --install-completion` installs a script that runs ssvi with these variables at each Tab;
    it answers without importing torch, as --help does."""
    code = ("import sys\nfrom ssvi_cli.__main__ import entry\ntry:\n    entry()\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules, file=sys.stderr)")
    env = {**os.environ, "COMP_WORDS": words, "COMP_CWORD": str(cword), "_SSVI_COMPLETE": "complete_bash"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert proc.stdout.split() == expected and proc.stderr.strip().splitlines()[-1] == "False", proc.stderr[-500:]


def test_a_model_other_than_the_presets_is_told_whose_recipe_it_trains_with(tmp_path: Path, capsys):
    """--model torchvision:resnet18 with the default preset trained a BatchNorm ResNet with the digits
    MLP's Adam and wide prior, and nothing said so."""
    from ssvi_cli.cli.train_config import recipe_note

    tiny = ["--epochs", "1", "--set", "data.max_train=64", "--set", "train.eval_samples=1", "--sparsity", "0.5"]
    assert run(["train", "--preset", "mnist_lenet5", "--data", "digits", "--model", "mlp", "--set", "model.widths=[8]",
                "--lr", "0.003", *tiny, "--out", str(tmp_path / "r")]) == 0
    said = capsys.readouterr().err
    assert ("note: mlp trains with preset mnist_lenet5, a recipe tuned for its lenet5 (here adam lr 0.003, prior "
            "sigma 0.1, 1 epoch: flags and --set change them)") in said, said
    assert run(["train", *tiny, "--set", "model.widths=[8]", "--out", str(tmp_path / "m")]) == 0
    assert "a recipe tuned for" not in capsys.readouterr().err  # the preset's own model
    from ssvi_cli import config as C

    assert recipe_note(C.load_preset("cifar10_resnet18"), "cifar10_resnet18") == ""


def test_the_epoch_line_shows_the_loss_as_nll_plus_kl(tmp_path: Path, capsys):
    """A fine-tuning run's loss climbed 300-fold as the KL weight warmed up, while its NLL fell: the
    line showed both and nothing said what the rest of the loss was."""
    import re

    assert run(["train", "--epochs", "2", "--set", "data.max_train=64", "--set", "train.eval_samples=1",
                "--out", str(tmp_path / "r")]) == 0
    lines = [l for l in capsys.readouterr().err.splitlines() if l.startswith("epoch ")]
    assert len(lines) == 2, lines
    kls = []
    for line in lines:
        loss, nll, kl = map(float, re.search(r"loss (\S+) \(nll (\S+) \+ weighted kl (\S+)\)", line).groups())
        assert abs(loss - nll - kl) < 2e-4 and kl >= 0, line
        kls.append(kl)
    assert kls[-1] > kls[0], lines  # the KL weight warms up from zero
    # metrics.jsonl's "kl" is the unweighted KL at the epoch's last step, as README says, not the line's
    record = json.loads((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["kl"] > 100 * kls[-1] and 0 < record["kl"] * record["kl_weight"] < 10 * kls[-1]


def test_the_recipe_note_names_a_preset_file_and_the_recipe_keys_a_file_leaves_to_the_schema(tmp_path: Path):
    from ssvi_cli import config as C
    from ssvi_cli.cli.train_config import recipe_note

    cfg = C.apply_overrides(C.load_preset("digits_mlp"), {"model.name": "lenet5"})
    (tmp_path / "mine.yaml").write_text("model:\n  name: mlp\noptim:\n  lr: 0.02\n")
    assert recipe_note(cfg, str(tmp_path / "mine.yaml")).startswith(
        f"note: lenet5 trains with the recipe of {tmp_path / 'mine.yaml'}, tuned for its mlp (here adam lr 0.01")
    # A file that leaves recipe keys out has the schema's (the CIFAR ResNet's prior): said, with a preset to copy.
    # A partial MLP file trained to below chance accuracy with prior_sigma 0.005, without a word.
    (tmp_path / "bare.yaml").write_text("optim:\n  lr: 0.02\nmethods:\n  ssvi:\n    train: {epochs: 3}\n")
    cfg = C.apply_overrides(C.load_preset(str(tmp_path / "bare.yaml"), "ssvi"), {"model.name": "lenet5"})
    assert recipe_note(cfg, str(tmp_path / "bare.yaml")) == (
        f"note: {tmp_path / 'bare.yaml'} does not set optim.name, bayes.prior_sigma, so the run takes the schema's "
        "defaults for them (optim.name=sgd, bayes.prior_sigma=0.005), where the preset mnist_lenet5 for lenet5 has "
        "optim.name=adam, bayes.prior_sigma=0.1; ssvi presets mnist_lenet5 prints it to start from")
    given = ["optim.name", "bayes.beta", "bayes.prior_sigma"]  # by flags or --set
    assert recipe_note(cfg, str(tmp_path / "bare.yaml"), given) == ""
    # the schema's defaults are the CIFAR ResNet recipe: a ResNet file that leaves them has it, nothing to say
    (tmp_path / "rn.yaml").write_text("model: {name: resnet18}\ndata: {name: cifar10}\n")
    assert recipe_note(C.load_preset(str(tmp_path / "rn.yaml"), "ssvi"), str(tmp_path / "rn.yaml")) == ""
    # an MLP on MNIST is pointed to MNIST's MLP preset, not the digits one
    (tmp_path / "mm.yaml").write_text("model: {name: mlp}\ndata: {name: mnist}\n")
    assert "the preset mnist_mlp for mlp" in recipe_note(C.load_preset(str(tmp_path / "mm.yaml"), "ssvi"),
                                                         str(tmp_path / "mm.yaml"))
    full = tmp_path / "full.yaml"  # a shipped preset's keys, all written: nothing to say
    full.write_text(C.dump_yaml(C.load_preset("digits_mlp")))
    assert recipe_note(C.load_preset(str(full)), str(full)) == ""


def test_train_json_shows_its_epochs_on_stderr_and_keeps_stdout_for_the_summary(tmp_path: Path, capsys):
    # under --json an hours-long run said nothing until its end
    assert run(["train", "--epochs", "2", "--set", "data.max_train=64", "--set", "train.eval_samples=1",
                "--out", str(tmp_path / "r"), "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["epochs"] == 2
    assert [l.split(" loss ")[0] for l in err.splitlines() if l.startswith("epoch ")] == ["epoch 1/2", "epoch 2/2"]
    assert err.startswith("training mlp on digits (64 train, 8 val, 360 test images)")


@pytest.mark.parametrize("line, said", [
    (["sweep", "--jobs", "0", "--dry-run"], "error: --jobs 0: give a whole number 1 or more"),
    (["train", "--nproc", "two"], "error: --nproc two: give a whole number"),
    (["evaluate", "m.safetensors", "--seed", "-1"], "error: --seed -1: give a whole number from 0 to 4294967295"),
    (["bench", "--repeats", "1.5"], "error: --repeats 1.5: give a whole number"),
    (["infer", "m.safetensors", "x.png", "--seed", "4294967296"],
     "error: --seed 4294967296: give a whole number from 0 to 4294967295"),
])
def test_a_bounded_whole_number_out_of_its_bounds_is_one_line(line, said, capsys):
    """The bound was shown in --help's metavar column (`<int range> [x>=1]`), which cut help words at 80
    columns; it is said when a value is outside it, in one line as ssvi's other checks of a value."""
    assert run(line) == 2
    assert capsys.readouterr().err.strip() == said


@pytest.mark.parametrize("command", ["train", "evaluate", "export", "infer", "inspect", "bench", "sweep", "presets"])
def test_every_help_reads_whole_at_80_columns(command):
    """Rich cut long words in --help with '…' at 80 columns: a flag name (--no-skip-unre…), a default
    path, an example (torchvision:ResNet18_W…)."""
    env = {**os.environ, "COLUMNS": "80", "TERMINAL_WIDTH": "80"}
    proc = subprocess.run([sys.executable, "-m", "ssvi_cli", command, "--help"], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 0 and "Usage: ssvi" in proc.stdout, proc.stderr
    assert max(len(l) for l in proc.stdout.splitlines()) <= 80
    assert "…" not in proc.stdout, [l for l in proc.stdout.splitlines() if "…" in l]


def test_ctrl_c_while_a_resume_reads_its_data_says_nothing_changed_and_how_to_resume(tmp_path: Path, capsys,
                                                                                      monkeypatch):
    """It said just "interrupted" (decoding a large image folder takes minutes)."""
    from ssvi_cli.training.plan import RunPlan

    out = tmp_path / "r"
    assert run(["train", "--epochs", "1", "--set", "data.max_train=64", "--set", "train.eval_samples=1",
                "--out", str(out), "--json"]) == 0
    (out / "summary.json").unlink()  # as if stopped after its last checkpoint
    (out / "model.safetensors").unlink()
    capsys.readouterr()

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(RunPlan, "resume", stopped)
    assert run(["train", "--resume", str(out)]) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"interrupted while the run's checkpoint and data were read, before it went on; nothing changed. Resume with: "
        f"ssvi train --resume {out}")


def test_a_name_too_long_for_the_system_is_a_one_line_usage_error(tmp_path: Path, capsys):
    """--out with a 300-byte name failed as 'error (OSError): [Errno 36] File name too long', exit 1."""
    long = tmp_path / ("x" * 300)
    assert run(["train", *SMALL, "--out", str(long)]) == 2
    said = capsys.readouterr().err
    assert f"error: {long}: a name too long for this system (most allow names of 255 bytes, paths of 4096)" in said
    deep = tmp_path.joinpath(*["d" * 100] * 45, "run")  # no name too long, the path is
    assert run(["train", *SMALL, "--out", str(deep)]) == 2
    assert f"error: {deep}: a path too long for this system" in capsys.readouterr().err


def test_a_dumb_terminal_gets_lines_not_a_progress_bar(monkeypatch):
    """TERM=dumb (an editor's shell) cannot redraw a bar: copies of it were left among the lines."""
    from ssvi_cli.cli.common import err, progress_bar

    monkeypatch.setattr(type(err), "is_terminal", property(lambda console: True))
    monkeypatch.setenv("TERM", "xterm-256color")
    with progress_bar() as bar:
        assert bar is not None
    monkeypatch.setenv("TERM", "dumb")
    with progress_bar() as bar:
        assert bar is None
    with progress_bar(enabled=False) as bar:
        assert bar is None


def test_tab_after_preset_offers_the_preset_files_in_the_working_folder_too(tmp_path, monkeypatch):
    """A preset name that matched hid a YAML file of the same start (the shell completes files only
    where nothing is offered): mnist_<Tab> gave the two presets and not mnist_wide.yaml."""
    from ssvi_cli.cli import completion

    for name in ("mnist_wide.yaml", "mnist_notes.txt", "digits_mine.json"):
        (tmp_path / name).write_text("{}")
    (tmp_path / "mnist_dir.yaml").mkdir()
    monkeypatch.chdir(tmp_path)
    assert completion.presets("mnist_") == ["mnist_lenet5", "mnist_mlp", "mnist_wide.yaml"]
    assert completion.presets("digits") == ["digits_mlp", "digits_mine.json"]
    assert completion.presets("./mn") == [] and completion.presets("sub/") == []  # the shell's own paths
