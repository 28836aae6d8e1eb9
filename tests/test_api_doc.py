"""docs/API.md's code blocks run, in order, as one script: the documented loop works as shown."""

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


def test_the_page_finds_its_blocks():
    assert code_blocks("x\n```python\na = 1\n```\ny\n```python\nb = 2\n```") == ["a = 1\n", "b = 2\n"]
