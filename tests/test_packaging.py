"""The installed package, not the source tree: a `pip install .` or a wheel has no presets/ folder
around it, so pyproject.toml ships them inside the package; every subpackage is named there."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parent.parent


def test_pyproject_names_every_subpackage_and_ships_the_presets():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "ssvi_cli").rglob("__init__.py")}
    assert set(setuptools["packages"]) == found | {"ssvi_cli.presets"}
    assert setuptools["package-dir"] == {"ssvi_cli.presets": "presets"}
    assert setuptools["package-data"]["ssvi_cli.presets"] == ["*.yaml"]


@pytest.mark.slow
def test_a_plain_install_lists_the_presets_and_trains_the_default(tmp_path: Path):
    """`pip install .` (not editable) left the presets behind: `ssvi train` said unknown preset
    'digits_mlp', valid names: (none)."""
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "--target", str(target), str(ROOT)], check=True, cwd=tmp_path, timeout=300,
                   env={**os.environ, "PIP_NO_CACHE_DIR": "1"})
    env = {**os.environ, "PYTHONPATH": str(target), "OMP_NUM_THREADS": "1"}

    def ssvi(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "ssvi_cli", *args], capture_output=True, text=True, cwd=tmp_path,
                              env=env, timeout=300)

    where = subprocess.run([sys.executable, "-c", "import ssvi_cli; print(ssvi_cli.__file__)"], capture_output=True,
                           text=True, cwd=tmp_path, env=env, check=True).stdout.strip()
    assert Path(where).is_relative_to(target)  # the installed copy, not the source tree
    listed = ssvi("presets", "--json")
    assert listed.returncode == 0, listed.stderr
    presets = {p["name"]: p for p in json.loads(listed.stdout)}
    assert {p.stem for p in (ROOT / "presets").glob("*.yaml")} == set(presets)
    trained = ssvi("train", "--sparsity", "0.95", "--set", "train.epochs=1", "--set", "data.max_train=200",
                   "--out", str(tmp_path / "run"), "--json")
    assert trained.returncode == 0, trained.stderr
    assert json.loads(trained.stdout)["model_file_bytes"] > 0
    # one version, written in ssvi_cli/version.py: the distribution's, --version's and the run's record
    from ssvi_cli.version import __version__

    assert [p.name for p in target.glob("ssvi-*.dist-info")] == [f"ssvi-{__version__}.dist-info"]
    assert ssvi("--version").stdout.strip() == f"ssvi {__version__}"
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["provenance"]["ssvi"] == __version__
