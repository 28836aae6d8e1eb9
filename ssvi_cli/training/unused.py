"""Which config keys change nothing in a run: another model's or data's keys, an optimizer's or a
schedule's that the run's choice does not read, and those its method never uses. ``ssvi presets`` and
``train --print-config`` mark them, ``train`` notes them when given, and a sweep does not compare them
(a cell that ran with another value of one trained as it would now)."""

from __future__ import annotations

from ssvi_cli import config as cfgmod


def unused_settings(cfg: cfgmod.Config) -> dict[str, str]:
    """The keys that change nothing in a run of ``cfg``, each with why: another model's or data's
    keys, augmentation where the data takes none, and what the method never uses."""
    from ssvi_cli.data import DATASETS
    from ssvi_cli.data.imagefolder import MIN_AUGMENT_SIZE
    from ssvi_cli.models import MODELS, model_entry

    unused = {}
    reads = model_entry(cfg.model.name)
    if not reads.widths:
        unused["model.widths"] = f"the hidden layers of {' or '.join(n for n, a in MODELS.items() if a.widths)} only"
    if not reads.first_conv:
        unused["model.dense_stem"] = f"{cfg.model.name} has no first conv"
    folder = cfgmod.image_folder(cfg.data.name) is not None
    if not folder:
        unused.update(dict.fromkeys(("data.test_fraction", "data.image_size", "data.channels", "data.mean", "data.std"),
                                    "image folders only"))
        if DATASETS.get(cfg.data.name).augment is None:
            unused["data.augment"] = f"{cfg.data.name} has no augmentation"
    elif cfg.data.image_size < MIN_AUGMENT_SIZE:
        unused["data.augment"] = f"images under {MIN_AUGMENT_SIZE} pixels take no augmentation"
    if cfg.optim.name != "sgd":
        unused["optim.momentum"] = f"{cfg.optim.name} takes no momentum"
    if cfg.bayes.mu_init != "fixed" and not reads.batchnorm:  # BatchNorm's layers start fixed
        unused["bayes.mu_init_std"] = f"bayes.mu_init=fixed only ({cfg.model.name} has no BatchNorm)"
    if cfg.sparse.delta_t != "auto":
        unused["sparse.min_subspace_steps"] = "sparse.delta_t=auto only"
    method = cfg.method
    for section, values in cfg.to_dict().items():
        for key in values:
            if method.never_uses(f"{section}.{key}"):
                unused.setdefault(f"{section}.{key}", f"--method {cfg.sparse.method} does not use it")
    return unused
