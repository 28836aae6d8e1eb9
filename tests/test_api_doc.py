"""docs/API.md's ```python blocks run, in order, as one script: the documented loop works as shown (the
reference's signatures are ```py blocks, not run)."""

import re
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "API.md"


def code_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_the_api_page_runs_as_written(capsys):
    blocks = code_blocks(DOC.read_text(encoding="utf-8"))
    assert len(blocks) >= 4
    namespace: dict = {}
    for i, block in enumerate(blocks):
        exec(compile(block, f"{DOC.name} block {i + 1}", "exec"), namespace)  # the doc's own asserts check it
    shown = capsys.readouterr().out
    assert "mean mutual information" in shown and "LBFGS keeps state" in shown
    # the loop checked the active counts after every step; the schedule really moved the support
    assert namespace["subspace"].last_report is not None and namespace["subspace"].last_report.swapped > 0
    # The outputs the page shows in comments come from the code as it is: a changed default (an init, a
    # learning rate) must regenerate them. Tolerances cover another CPU's arithmetic, not another recipe.
    text = DOC.read_text(encoding="utf-8")
    losses = [float(v) for v in re.search(r"for v in losses\]\)\s+# \[([^\]]*)\]", text).group(1).split(",")]
    assert len(losses) == len(namespace["losses"])
    assert all(abs(a - b) <= 0.05 * b for a, b in zip(namespace["losses"], losses)), (namespace["losses"], losses)
    accuracy = float(re.search(r"# accuracy ([0-9.]+), mean entropy", text).group(1))
    assert abs(namespace["accuracy"] - accuracy) <= 0.015, namespace["accuracy"]
    size = int(re.search(r"# ([0-9,]+) bytes, identical", text).group(1).replace(",", ""))
    assert abs(namespace["size"] - size) <= 0.01 * size, namespace["size"]


def test_the_page_finds_its_blocks():
    assert code_blocks("x\n```python\na = 1\n```\ny\n```python\nb = 2\n```") == ["a = 1\n", "b = 2\n"]
    assert code_blocks("```py\nssvi.load(path)\n```") == []  # a signature, not code to run


def test_the_readmes_python_runs_once_its_free_names_are_given(tmp_path, monkeypatch):
    """The README's sketch names the user's own model, data and pixels without making them; given those
    (and a run folder 'ssvi train' wrote), it runs as written: its loop ran one epoch of the
    len(loader) * epochs steps it gave Subspace, so the support never moved, and it saved over the
    model.safetensors the README's commands had exported."""
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from ssvi_cli.cli import run
    from ssvi_cli.data import digits

    readme = Path(__file__).resolve().parent.parent / "README.md"
    (block,) = code_blocks(readme.read_text(encoding="utf-8"))
    monkeypatch.chdir(tmp_path)
    assert run(["train", "--epochs", "1", "--set", "train.eval_samples=1", "--out", "run"]) == 0
    before = Path("run/model.safetensors").read_bytes()
    images, labels = digits.load()
    train = digits.split_indices(train=True)
    dataset = TensorDataset(torch.tensor(images[train] / 16, dtype=torch.float32).flatten(1), torch.tensor(labels[train]))
    torch.manual_seed(0)
    namespace = {"model": nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10)), "dataset": dataset,
                 "loader": DataLoader(dataset, batch_size=64, shuffle=True), "epochs": 8, "pixels": images[:7]}
    exec(compile(block, "README.md's python block", "exec"), namespace)
    assert namespace["subspace"].last_report is not None and namespace["subspace"].last_report.swapped > 0
    assert namespace["draws"].shape == (30, len(namespace["x"]), 10)
    assert namespace["out"].probs.shape == (7, 10) and Path("mine.safetensors").is_file()
    assert Path("run/model.safetensors").read_bytes() == before
