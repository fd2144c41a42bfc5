"""Every ```python block of README.md runs as written, in a fresh namespace and an empty temporary directory.

A block that cannot run on a test machine (a hub download, a GPU) is fenced as ```python no-run; any other info
string after ``python`` is refused, so a new block is either executed here or explicitly marked.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
_FENCE = re.compile(r"^```python(?P<info>[^\n]*)\n(?P<code>.*?)^```[ \t]*$", re.M | re.S)


def _blocks() -> list[tuple[int, str, str]]:
    text = README.read_text(encoding="utf-8")
    return [(text[: m.start()].count("\n") + 1, m.group("info").strip(), m.group("code"))
            for m in _FENCE.finditer(text)]


def test_every_python_block_is_run_or_marked():
    blocks = _blocks()
    assert any(info == "" for _, info, _ in blocks), "the README has no runnable python example"
    for line, info, _ in blocks:
        assert info in ("", "no-run"), f"README.md line {line}: ```python {info}: use ```python or ```python no-run"


@pytest.mark.slow
@pytest.mark.parametrize("line", [line for line, info, _ in _blocks() if info == ""])
def test_readme_python_block_runs(line, tmp_path, monkeypatch):
    code = next(code for at, _, code in _blocks() if at == line)
    from moeaudit import AblationResult

    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__readme__"}
    exec(compile(code, f"README.md (block at line {line})", "exec"), namespace)
    for name, value in namespace.items():  # an example ablating an expert that is not routed shows ΔL = 0
        if isinstance(value, AblationResult):
            assert value.removed_weight > 0, f"README.md block at line {line}: {name} removes an unrouted expert"
