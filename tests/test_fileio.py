import os
import stat

import torch
from safetensors.torch import save_file

from ssvi_cli.fileio import atomic_path, brief, write_text


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


def test_a_readers_error_in_brief_ends_at_a_sentence_or_a_word():
    torch_says = ("PytorchStreamReader failed reading zip archive: failed finding central directory. This is an "
                  "internal miniz error. If you are seeing this error, there is a high chance that your file is corrupted")
    assert brief(RuntimeError(torch_says)) == ("PytorchStreamReader failed reading zip archive: failed finding central "
                                               "directory. This is an internal miniz error.")
    words = brief(ValueError("one two three " * 30), limit=40)
    assert words == "one two three one two three one two..."
    assert brief(RuntimeError("\x1b[1mWeights only\x1b[0m load failed\nmore")) == "Weights only load failed"
    assert brief(EOFError()) == "EOFError" and brief("short") == "short"
