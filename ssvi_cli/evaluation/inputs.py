"""What an evaluation reads: the in-distribution split (the model's own dataset or another of the
same shape and classes, normalised as the model file records) and every OOD set, each checked
before any file is read."""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from torch.utils.data import Dataset

from ssvi_cli.config import image_folder
from ssvi_cli.data import (DataError, DataSpec, build_dataset, check_dataset_name, data_config_for, dataset_names,
                           get_spec)
from ssvi_cli.data.ood import ood_names
from ssvi_cli.data.images import whole_jpegs
from ssvi_cli.data.spec import absent_classes
from ssvi_cli.evaluation.ood_sets import load_requests, resolve_requests, source_digests
from ssvi_cli.modelfile import NO_DATASET, Training

SPLITS = ("test", "val", "all")
OOD_MAX_ITEMS = 2000  # items drawn (seeded) from each OOD set


@dataclass
class EvalData:
    """The in-distribution split and the OOD sets, already shaped like the model's inputs."""

    dataset: str
    split: str
    inputs: Dataset
    ood: dict[str, Dataset] = field(default_factory=dict)
    ood_seed_keys: dict[str, str] = field(default_factory=dict)  # label -> what seeds its draws (OodRequest)
    ood_sources: dict[str, str] = field(default_factory=dict)  # label -> digest of the user's own folder or array
    notes: list[str] = field(default_factory=list)  # what the reader should know about the inputs

    def total_items(self) -> int:
        """Images to predict in all (for a progress bar)."""
        return len(self.inputs) + sum(len(d) for d in self.ood.values())



def _training_data_settings(training: Training) -> tuple[dict[str, Any], Optional[int]]:
    """The data section of the recorded training config and the training seed (empty/None if the
    model does not record them)."""
    config = training.config or {}
    data = config.get("data") if isinstance(config.get("data"), dict) else {}
    seed = training.seed if training.seed is not None else (config.get("train") or {}).get("seed")
    return dict(data), seed


def _other_classes_hint(name: str, spec: DataSpec, model_spec: DataSpec) -> str:
    """How to score a dataset whose classes are not the model's: as OOD data, or (a folder with fewer
    classes) whole with --split all, its class folders named as the model's classes."""
    if name in ood_names():
        return f"; score it as out-of-distribution with --ood {name} instead"
    if image_folder(name) is None or spec.input_shape != model_spec.input_shape \
            or spec.num_classes >= model_spec.num_classes:
        return ""
    ours = {unicodedata.normalize("NFC", n) for n in model_spec.class_names}
    unknown = [n for n in spec.class_names if unicodedata.normalize("NFC", n) not in ours]
    if len(unknown) == spec.num_classes:  # none of the model's: another task's data
        return ""
    named = (f" (named as the model's classes: {', '.join(map(repr, unknown[:3]))}{', ...' if len(unknown) > 3 else ''} "
             f"{'is' if len(unknown) == 1 else 'are'} not one of {', '.join(map(repr, model_spec.class_names[:10]))}"
             f"{', ...' if model_spec.num_classes > 10 else ''})" if unknown else "")
    return f"; a labelled folder that holds some of the model's classes is scored whole with --split all{named}"


def _check_compatible(name: str, spec: DataSpec, model_spec: DataSpec) -> None:
    if spec.input_shape != model_spec.input_shape or spec.num_classes != model_spec.num_classes:
        raise DataError(
            f"dataset {name} has inputs {spec.input_shape} and {spec.num_classes} classes, but the model "
            f"takes {model_spec.input_shape} and predicts {model_spec.num_classes} classes"
            + _other_classes_hint(name, spec, model_spec))
    placeholders = tuple(str(i) for i in range(model_spec.num_classes))  # ssvi.save without class_names
    named = tuple(model_spec.class_names) != placeholders
    # Names compared as text, not as code points: macOS writes a folder "grün" decomposed (NFD), most
    # other systems composed (NFC); both print alike.
    ours, theirs = (tuple(unicodedata.normalize("NFC", n) for n in names)
                    for names in (model_spec.class_names, spec.class_names))
    if named and spec.class_names and theirs != ours:
        differ = next(i for i, (a, b) in enumerate(zip(theirs, ours)) if a != b)
        fix = ("name the class folders as the model's classes" if image_folder(name) is not None
               else f"score it as out-of-distribution with --ood {name}" if name in ood_names()
               else "evaluate on the model's own dataset")
        raise DataError(
            f"dataset {name}'s classes are not the model's: class {differ} is {spec.class_names[differ]!r} there and "
            f"{model_spec.class_names[differ]!r} in the model; labels are matched by position, so the scores would "
            f"be wrong ({fix})")


def load_eval_data(
    model_spec: DataSpec,
    training: Training,
    *,
    dataset: Optional[str] = None,
    split: str = "test",
    ood: tuple[str, ...] = (),
    data_dir: Optional[Path] = None,
    download: bool = False,
    seed: int = 0,
    ood_max_items: Optional[int] = OOD_MAX_ITEMS,
) -> EvalData:
    """Load the split to evaluate (default: the model's own dataset) and every OOD set.

    ``val`` is the training-time validation split: the same ``val_fraction``, ``max_train`` and
    seed as the training config recorded in ``training``. A model trained on part of the classes
    is evaluated on those classes, and ``ood`` may ask for the others (``heldout``); its values may
    also be ``NAME=DIR`` or a path (``data.ood.parse_ood``). Every name and path is checked before
    any file is read, so a typo fails at once with the list of valid names.
    """
    with whole_jpegs(model_spec.reads_jpegs_whole):  # its JPEGs read as its training read them
        name = dataset or model_spec.name
        if name == NO_DATASET:
            raise DataError("the model file records no dataset (ssvi.save without dataset=); name the one to evaluate "
                            "on with --data")
        folder = image_folder(name)
        if dataset is None and folder and not Path(folder).expanduser().is_dir():
            raise DataError(f"the model was trained on the image folder {folder}, which is not there now; if it has "
                            "moved, give its new place with --data imagefolder:PATH")
        if split not in SPLITS:
            raise DataError(f"unknown split {split!r}; valid splits are: {', '.join(SPLITS)}")
        if split != "all":  # every image of a folder, by class name: its own checks (whole_folder)
            try:
                check_dataset_name(name, data_config_for(model_spec))
            except DataError:
                if dataset is None and folder is None:  # the file's own record (ssvi.save's dataset=): what to pass
                    raise DataError(f"the model file records the dataset {name!r}, which ssvi does not know; name the "
                                    f"data to evaluate on with --data: one of {', '.join(dataset_names())} or "
                                    "imagefolder:PATH (your class folders)") from None
                raise
        requests = resolve_requests(ood, model_spec, name)
        if split != "all":
            current = get_spec(name, data_config_for(model_spec))
            _check_compatible(name, current, model_spec)
            model_spec.check_same_files(current)  # a changed flat image folder would redraw its test split

        settings, train_seed = _training_data_settings(training)
        if split == "val" and train_seed is None:
            raise DataError("the model file does not record its training config, so its validation split "
                            "cannot be rebuilt; use --split test")
        recorded_dir = settings.get("data_dir")
        root = data_dir if data_dir is not None else (Path(recorded_dir).expanduser() if recorded_dir else None)
        if split == "all":
            return _whole_folder(name, folder, model_spec, requests, root, download, seed, ood_max_items)
        splits = build_dataset(
            name, data_dir=root, download=download, val_fraction=float(settings.get("val_fraction", 0.1)),
            seed=int(train_seed or 0), augment=False, max_train=settings.get("max_train"),
            options=data_config_for(model_spec, settings), needed=(split,),
        )
        if split == "val" and len(splits.val) == 0:
            raise DataError("the model was trained on its whole training set (data.val_fraction 0), so it has "
                            "no validation split; use --split test")
        ood_sets = load_requests(requests, model_spec, root, download, seed, ood_max_items, splits.heldout)
        # Normalised as the model file records (ssvi.save mean=, std=), as infer feeds it.
        loaded = getattr(splits, split)
        inputs, notes = loaded.normalised_as(model_spec), []
        if inputs is not loaded:
            notes.append(f"the inputs were normalised as the model file records (mean {list(model_spec.mean)}, std "
                         f"{list(model_spec.std)}), not as the loaders of {name} do (mean {list(splits.spec.mean)}, "
                         f"std {list(splits.spec.std)}); if the model was trained on the loaders' inputs, save it again "
                         "with ssvi.save(..., mean=, std=) as they are")
        notes += absent_classes(inputs, model_spec, f"the {split} split")
        if split == "test" and training.method is None and training.config is None:  # ssvi.save from one's own loop
            notes.append(f"the model file records no training run (saved with ssvi.save), so whether these "
                         f"{len(inputs)} test images (ssvi's test split of {name}) were left out of its training "
                         "is not known here")
        capped = settings.get("max_test")
        if split == "test" and isinstance(capped, int) and capped < len(inputs):  # a quick run's own numbers
            notes.append(f"the run's own final evaluation scored {capped} of these {len(inputs)} test images "
                         "(data.max_test), so its summary's test numbers differ from these")
        return EvalData(dataset=name, split=split, inputs=inputs, ood=ood_sets, notes=notes,
                        ood_seed_keys={label: request.seed_key for label, request in requests.items()},
                        ood_sources=source_digests(requests))


def _whole_folder(name: str, folder: Optional[str], model_spec: DataSpec, requests: dict[str, Any],
                  root: Optional[Path], download: bool, seed: int, ood_max_items: Optional[int]) -> EvalData:
    """``--split all``: every image of an image folder, labelled by class name (``whole_folder``)."""
    from ssvi_cli.data.imagefolder import whole_folder

    if folder is None:
        raise DataError(f"--split all scores every image of an image folder; {name} is not one (use --split test)")
    if "heldout" in requests:
        raise DataError("--ood heldout is the test split's other classes; with --split all give them as --ood PATH")
    inputs = whole_folder(folder, data_config_for(model_spec), tuple(model_spec.class_names))
    trained_on = image_folder(model_spec.name)
    own = trained_on is not None and Path(folder).expanduser().resolve() == Path(trained_on).expanduser().resolve()
    notes = [f"every image of {name} was scored, its training images too: the model was trained on this folder"
             ] if own else []
    ood_sets = load_requests(requests, model_spec, root, download, seed, ood_max_items)
    notes += absent_classes(inputs, model_spec, name)
    return EvalData(dataset=name, split="all", inputs=inputs, ood=ood_sets, notes=notes,
                    ood_seed_keys={label: request.seed_key for label, request in requests.items()},
                    ood_sources=source_digests(requests))
