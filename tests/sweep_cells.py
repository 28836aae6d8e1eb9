"""What the sweep tests share: the settings of a small, quick cell."""

# Small cells: a 32-unit MLP on 300 digits, a few epochs, a subspace step every 2 minibatches.
TINY = ["--set", "model.widths=[32]", "--set", "data.max_train=300", "--set", "train.eval_samples=2",
        "--set", "sparse.delta_t=2", "--samples", "2"]
