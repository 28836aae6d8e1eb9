"""``ssvi train``'s command line as a run's Config: the preset, the flags and ``--set``, each key
given once; what of it the run's method cannot use; and the notes about its setup."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Optional

from ssvi_cli import config as cfgmod
from ssvi_cli.cli.common import UsageError, count, err, out, print_json
from ssvi_cli.machine import quote_path
from ssvi_cli.training.unused import unused_settings


def build_config(preset: Optional[str], overrides: dict[str, Any], sets: list[str]) -> cfgmod.Config:
    """The preset, with its values for the chosen method, then the flags and ``--set`` values; a key
    set twice (a flag and ``--set``, or two ``--set``) is refused rather than one value dropped. With
    no preset (None), a run from a trained ssvi model (``model.init_from``) starts from the config
    that model was trained with, and any other from the default preset."""
    flat = {k: v for k, v in overrides.items() if v is not None}
    for text in sets:
        key, value = cfgmod.parse_override(text)
        if key in flat:
            given = f"{flag_of(key)} and --set" if overrides.get(key) is not None else "two --set"
            raise UsageError(f"{key} is given twice ({given}); give it once")
        flat[key] = value
    from ssvi_cli.training.init_posterior import names_trained_model, recorded_config

    source = flat.get("model.init_from")
    try:
        if preset is None and isinstance(source, str) and names_trained_model(source):
            base, data = recorded_config(source), flat.get("data.name")
            if cfgmod.image_folder(base.data.name) is not None and isinstance(data, str) and cfgmod.image_folder(data) is None:
                # an image folder's own settings (its size, channels, normalisation) do not go to other data
                base = cfgmod.apply_overrides(base, {f"data.{k}": getattr(cfgmod.DataConfig, k)
                                                     for k in cfgmod.IMAGEFOLDER_KEYS})
            return cfgmod.with_absolute_paths(cfgmod.apply_overrides(base, flat))
        return cfgmod.from_preset(preset or cfgmod.DEFAULT_PRESET, flat)
    except cfgmod.ConfigError as exc:  # a value a flag gave is named by that flag, as the user wrote it
        key = str(exc).partition("=")[0]
        if overrides.get(key) is None:
            raise
        raise cfgmod.ConfigError(f"{flag_of(key)}: {exc}") from None


def config_origin(cfg: cfgmod.Config, preset: Optional[str]) -> str:
    """Where a new run's config came from, for its ``config.yaml``: the shipped preset by name, a
    preset file by its absolute path, or the trained model ``--init-from`` took its config from."""
    from ssvi_cli.training.init_posterior import names_trained_model

    then = ", then this command line's flags and --set values; the values below are what ran"
    if preset is None and names_trained_model(cfg.model.init_from):
        return f"the config of the trained model {cfg.model.init_from} (--init-from){then}"
    name = preset or cfgmod.DEFAULT_PRESET
    if name in cfgmod.list_presets():
        return f"the preset {name}{then}"
    return f"the preset file {Path(name).expanduser().resolve()}{then}"


def default_run_dir(cfg: cfgmod.Config, preset: Optional[str]) -> Any:
    """``runs/<time>-<preset>-<method>[-s<sparsity>]``; a run from a trained ssvi model without a preset
    is named after that model (``from-NAME``)."""
    from ssvi_cli.runs.checkpoint import CHECKPOINT_DIR
    from ssvi_cli.runs.rundir import MODEL_FILE, RunDir
    from ssvi_cli.training.init_posterior import names_trained_model

    if preset is None and names_trained_model(cfg.model.init_from):
        source = Path(str(cfg.model.init_from)).expanduser().resolve()
        # a run's own model file or checkpoint says nothing by its name ("model"): the run's folder does
        named = source
        if source.name == MODEL_FILE:
            named = source.parent
        elif source.parent.name == CHECKPOINT_DIR and source.suffix == ".pt":
            named = source.parent.parent
        name = named.name if named.is_dir() else named.stem
        preset = "from-" + (re.sub(r"^\d{8}-\d{6}-", "", name) or name)  # a default run name's time stays its own
    return RunDir.default(preset or cfgmod.DEFAULT_PRESET, cfg.sparse.method, cfg.sparse.sparsity if cfg.density < 1 else None)


def pin_init_from(args: list[str], read: Optional[str]) -> list[str]:
    """``ssvi train``'s arguments with the trained model of ``--init-from`` (or ``--set
    model.init_from=``) named by the file ``read`` that the launcher checked, so that every process
    starts from that one (a run still training writes newer checkpoints meanwhile)."""
    if read is None:
        return args
    pinned = list(args)
    for i in range(len(pinned) - 1):
        if pinned[i] == "--init-from":
            pinned[i + 1] = read
        elif pinned[i] == "--set" and pinned[i + 1].partition("=")[0].strip() == "model.init_from":
            pinned[i + 1] = f"model.init_from={read}"
    return pinned


def flag_of(key: str) -> str:
    """The flag of ``ssvi train`` that sets config ``key`` (``train.batch_size``: ``--batch-size``)."""
    return {"model.name": "--model", "data.name": "--data"}.get(key, "--" + key.rpartition(".")[2].replace("_", "-"))


def unused_keys(cfg: cfgmod.Config, overrides: dict[str, Any], sets: list[str]) -> list[str]:
    """What the command line gave that the run's method cannot use (``Method.never_uses``), as given:
    a flag, or ``--set KEY``."""
    method = cfg.method
    return sorted(shown for k, shown in _given(overrides, sets).items() if method.never_uses(k))


def marked_yaml(text: str, unused: dict[str, str]) -> str:
    """The YAML of a config with a comment after each key of ``unused`` (a ``methods:`` section's keys
    are left as they are: they are the keys a method does use)."""
    lines, section = [], ""
    for line in text.splitlines():
        if line and not line[0].isspace():
            section = line.rstrip(":")
        elif line.startswith("  ") and not line.startswith("   ") and ":" in line:
            key = f"{section}.{line.strip().partition(':')[0]}"
            if key in unused:
                line += f"  # not used: {unused[key]}"
        lines.append(line)
    return "\n".join(lines)


def show_config(data: dict[str, Any], unused: dict[str, str], header: str, json_out: bool) -> None:
    """A config's sections ``data`` as YAML that ``--preset`` reads back, after a ``# header`` comment,
    each key of ``unused`` marked (:func:`unused_settings`); or as JSON. ``ssvi presets NAME`` and
    ``train --print-config``."""
    import yaml

    if json_out:
        print_json(data)
        return
    out.print(f"# {header}" + ("; a key marked 'not used' changes nothing for this model, data and method"
                               if unused else ""), highlight=False)
    out.print(marked_yaml(yaml.safe_dump(data, sort_keys=False).rstrip("\n"), unused), highlight=False, soft_wrap=True)


def idle_settings_note(cfg: cfgmod.Config, overrides: dict[str, Any], sets: list[str]) -> str:
    """A note naming the keys the command line gave that change nothing for this model, data and
    optimizer (:func:`unused_settings`; those the method never uses are :func:`unused_keys`'), with why."""
    unused, method = unused_settings(cfg), cfg.method
    idle = {shown: unused[k] for k, shown in _given(overrides, sets).items() if k in unused and not method.never_uses(k)}
    return "\n".join(f"note: {shown} changes nothing here ({why})" for shown, why in sorted(idle.items()))


def _given(overrides: dict[str, Any], sets: list[str]) -> dict[str, str]:
    """The keys the command line gave, each as given: its flag, or ``--set KEY``."""
    return {k: flag_of(k) for k, v in overrides.items() if v is not None} | {k: f"--set {k}" for k in set_keys(sets)}


def set_keys(sets: list[str]) -> list[str]:
    """The config keys ``--set`` gives (read by :func:`build_config`, which refuses a bad one first)."""
    return [cfgmod.parse_override(text)[0] for text in sets]


def init_from_lr_note(cfg: cfgmod.Config, overrides: dict[str, Any], sets: list[str]) -> str:
    """A note for a run that starts from trained deterministic weights (``--init-from``) with Adam at a
    learning rate for training from scratch, which the command line did not choose: a few such steps
    undo them (a trained ResNet-18 fell to chance accuracy within an epoch at the digits preset's
    0.01). A trained ssvi model goes on at the rate of its own config, so nothing is said."""
    from ssvi_cli.training.init_posterior import names_trained_model

    if (not cfg.model.init_from or names_trained_model(cfg.model.init_from) or cfg.optim.name != "adam" or cfg.optim.lr <= 1e-3
            or overrides.get("optim.lr") is not None or "optim.lr" in set_keys(sets)):
        return ""
    return (f"note: --init-from starts from trained weights, which Adam at this preset's learning rate "
            f"{cfg.optim.lr:g} (for training from scratch) can undo within a few steps; fine-tuning "
            "usually wants a rate near 1e-4 (--lr 1e-4)")


def threads_note(run: Any, device_type: str) -> str:
    """A note for a run resumed on another number of CPU threads than its last epoch: its numbers move
    in their last digits with it (a sweep's --jobs sets it)."""
    import torch

    from ssvi_cli.fileio import read_jsonl

    before = next((r.get("threads") for r in reversed(read_jsonl(run.metrics_file)) if "threads" in r), None)
    if not isinstance(before, int) or before == torch.get_num_threads() or device_type != "cpu":
        return ""
    return (f"note: the run trained on {count(before, 'CPU thread')} so far and goes on with "
            f"{torch.get_num_threads()}; its numbers move in their last digits with the thread count")


def processes_note(global_batch: int, batch_size: int, world_size: int) -> str:
    """A note for a run resumed on another number of processes than it started on (its global batch
    stays; each process takes its share)."""
    started = global_batch // batch_size if batch_size else world_size
    if started == world_size or started < 1:
        return ""
    return (f"note: the run started on {started} process{'es' if started > 1 else ''} and goes on with {world_size}; "
            f"its global batch stays {global_batch}")


RECIPE_KEYS = ("optim.name", "optim.lr", "bayes.beta", "bayes.prior_sigma", "train.epochs")


def recipe_note(cfg: cfgmod.Config, preset: Optional[str], given: Any = ()) -> str:
    """A note for a model another than its preset's: it trains with a recipe tuned for that model (the
    default preset's Adam and wide prior are the digits MLP's, not a ResNet's). A preset file that
    leaves out a key of the recipe (``RECIPE_KEYS``), which neither a flag nor ``--set`` (``given``)
    sets, has the schema's default for it, said with a shipped preset of its model to start from. A
    run from a trained ssvi model with no preset is told whose config it has."""
    from ssvi_cli.training.init_posterior import names_trained_model

    if preset is None and names_trained_model(cfg.model.init_from):
        return (f"note: the run has the config {cfg.model.init_from} was trained with, and the command line's "
                "changes; --preset starts from a preset instead")
    preset = preset or cfgmod.DEFAULT_PRESET
    if preset in cfgmod.list_presets():
        base, where = cfgmod.load_preset(preset).model.name, f"preset {preset}, a recipe"
    else:
        data = cfgmod.read_yaml(Path(preset).expanduser().read_text(encoding="utf-8"))
        base = ((data or {}).get("model") or {}).get("name") if isinstance(data, dict) else None
        where = f"the recipe of {preset},"
        if base is None or cfg.model.name == base:
            return _schema_note(cfg, preset, data, given)
    if base is None or cfg.model.name == base:
        return ""
    o = cfg.optim
    return (f"note: {cfg.model.name} trains with {where} tuned for its {base} "
            f"(here {o.name} lr {o.lr:g}, prior sigma {cfg.bayes.prior_sigma:g}, {count(cfg.train.epochs, 'epoch')}: "
            "flags and --set change them); ssvi presets lists the others, the CIFAR ones the paper's for ResNet-18")


def _schema_note(cfg: cfgmod.Config, preset: str, data: Any, given: Any) -> str:
    """The recipe keys a preset file (``data``; its ``methods:`` section for the run's method too)
    leaves to the schema's defaults where a shipped preset of its model (of its data first) has other
    values, with that preset's name; or ""."""
    shipped = {name: cfgmod.load_preset(name, cfg.sparse.method) for name in cfgmod.list_presets()}
    same = sorted((n for n, p in shipped.items() if p.model.name == cfg.model.name),
                  key=lambda n: shipped[n].data.name != cfg.data.name)  # of its data first
    if not same:
        return ""
    sections = dict(data) if isinstance(data, dict) else {}
    methods = sections.get("methods") if isinstance(sections.get("methods"), dict) else {}
    own = methods.get(cfg.sparse.method) if isinstance(methods.get(cfg.sparse.method), dict) else {}
    written = {f"{sec}.{key}" for part in (sections, own) for sec, keys in part.items() if isinstance(keys, dict)
               for key in keys}
    name = same[0]
    values, recipe = cfgmod.flat_dict(cfg), cfgmod.flat_dict(shipped[name])
    left = [k for k in RECIPE_KEYS if k not in written and k not in set(given) and values[k] != recipe[k]]
    if not left:
        return ""
    return (f"note: {preset} does not set {', '.join(left)}, so the run takes the schema's defaults for them ("
            + ", ".join(f"{k}={values[k]}" for k in left) + f"), where the preset {name} for {cfg.model.name} has "
            + ", ".join(f"{k}={recipe[k]}" for k in left) + f"; ssvi presets {name} prints it to start from")


def nproc_again(world_size: int) -> str:
    """`` --nproc N`` for the resume command of a run of N processes on one node (``--nproc N``, or
    torchrun with as many processes on its node, which ``--nproc N`` starts alike); nothing for a run
    over several nodes, which the user starts again as they started it."""
    import os

    from ssvi_cli.training.launcher import PARENT_ENV

    one_node = os.environ.get(PARENT_ENV) or os.environ.get("LOCAL_WORLD_SIZE") == str(world_size)
    return f" --nproc {world_size}" if world_size > 1 and one_node else ""


def finished_run(run_dir: Path, json_out: bool, is_main: bool) -> bool:
    """A run that already wrote its model file and summary has nothing to resume: say so (with
    ``--json`` print its summary) and change nothing."""
    from ssvi_cli.runs.rundir import RunDir

    run = RunDir(run_dir)
    if not run.finished():
        return False
    summary = run.read_summary()
    if is_main:
        note = (f"{run_dir} has finished ({run.summary_file.name} and {run.model_file.name} written); nothing "
                f"to resume. Evaluate it: ssvi evaluate {quote_path(run.model_file)}")
        if json_out:
            print_json({**summary, "notes": [note]})  # the shape a finished run's --json has
        err.print(note, highlight=False)
    return True


def train_flag_hint(option: str) -> Optional[str]:
    """For a flag ``ssvi sweep`` lacks that names a config key as ``ssvi train``'s flags do (``--epochs``,
    ``--data-dir``), the ``--set`` that gives it; None for any other."""
    from ssvi_cli.config import key_type, valid_keys

    if option == "--seed":
        return "ssvi sweep takes no --seed: --seeds N runs seeds 0 to N-1 (a seed list: --file, seeds: [..])"
    key = next((k for k in valid_keys() if flag_of(k) == option), None)
    if key is None:
        return None
    listed = "tuple" in str(key_type(key))  # tuple[int, ...], Optional[tuple[str, ...]]
    axis = f"{key}=[A],[B]" if listed else f"{key}=A,B"  # a list-valued key reads A,B as one list
    return f"ssvi sweep takes no {option}: --set {key}=VALUE gives every cell that value (--set {axis} sweeps it)"
