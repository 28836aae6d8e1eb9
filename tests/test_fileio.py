import os
import stat

import torch
from safetensors.torch import save_file

from ssvi_cli.fileio import atomic_path, write_text


def test_atomic_files_get_the_usual_permissions(tmp_path):
    mask = os.umask(0o022)
    try:
        write_text(tmp_path / "a.txt", "x")
        with atomic_path(tmp_path / "m.safetensors") as tmp:
            save_file({"w": torch.zeros(2)}, str(tmp))  # safetensors itself creates files 0600
    finally:
        os.umask(mask)
    for name in ("a.txt", "m.safetensors"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "m.safetensors"]
