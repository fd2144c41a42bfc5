"""The documentation site: it builds strictly, and every ```python block under docs/ runs as written.

The blocks of one page run in order in one namespace (a tutorial builds on its earlier steps), in an empty
temporary directory. As in the README (tests/test_readme.py), a block that cannot run on a test machine is fenced
```python no-run; any other info string is refused. ``mkdocs build --strict`` fails on a broken link or anchor, a
page missing from the nav, a griffe warning about a docstring, and (through docs/hooks/moeaudit_docs.py) a public
name of ``moeaudit`` that is not rendered or has no docstring.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
_FENCE = re.compile(r"^```python(?P<info>[^\n]*)\n(?P<code>.*?)^```[ \t]*$", re.M | re.S)
_HAS_MKDOCS = all(importlib.util.find_spec(m) for m in ("mkdocs", "material", "mkdocstrings_handlers.python"))
needs_mkdocs = pytest.mark.skipif(not _HAS_MKDOCS, reason="the docs extra is not installed (pip install -e '.[docs]')")


def _pages() -> list[Path]:
    return sorted(p for p in DOCS.rglob("*.md"))


def _blocks(page: Path) -> list[tuple[int, str, str]]:
    text = page.read_text(encoding="utf-8")
    return [(text[: m.start()].count("\n") + 1, m.group("info").strip(), m.group("code"))
            for m in _FENCE.finditer(text)]


def _hook():
    spec = importlib.util.spec_from_file_location("moeaudit_docs_hook", DOCS / "hooks" / "moeaudit_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_python_block_is_run_or_marked():
    assert any(info == "" for page in _pages() for _, info, _ in _blocks(page)), "no runnable python block in docs/"
    for page in _pages():
        for line, info, _ in _blocks(page):
            assert info in ("", "no-run"), (
                f"{page.relative_to(ROOT)} line {line}: ```python {info}: use ```python or ```python no-run")


@pytest.mark.slow
@pytest.mark.parametrize("page", [str(p.relative_to(DOCS)) for p in _pages()
                                  if any(info == "" for _, info, _ in _blocks(p))])
def test_docs_python_blocks_run(page, tmp_path, monkeypatch):
    from moeaudit import AblationResult

    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__docs__"}
    for line, info, code in _blocks(DOCS / page):
        if info == "":
            exec(compile(code, f"docs/{page} (block at line {line})", "exec"), namespace)
    for name, value in namespace.items():  # an example ablating an expert that is not routed shows ΔL = 0
        if isinstance(value, AblationResult):
            assert value.removed_weight > 0, f"docs/{page}: {name} removes an unrouted expert"


def test_cli_reference_is_generated_from_the_typer_app():
    import typer

    from moeaudit.cli import app

    markdown = _hook().cli_markdown()
    group = typer.main.get_command(app)
    for name, command in group.commands.items():
        assert f"## `moeaudit {name}`" in markdown
        options = [p for p in command.params if p.param_type_name == "option" and not p.hidden]
        assert options, f"moeaudit {name} has no option: the reference would be empty"
        for param in command.params:
            if param in options or param.param_type_name == "argument":
                assert f"| `{param.opts[0] if param in options else param.name}" in markdown, (
                    f"moeaudit {name} {param.opts[0]} is missing")


def test_hook_names_public_api_that_is_not_rendered():
    import moeaudit

    hook = _hook()
    everything = {f"{module}.{name}" for name, module in moeaudit._EXPORTS.items()} | {"moeaudit.stats"}
    assert hook.missing_api(everything) == []
    assert hook.missing_api(everything - {"moeaudit.run.pipeline.run_audit"}) == ["moeaudit.run.pipeline.run_audit"]
    assert hook.undocumented() == []


@needs_mkdocs
def test_mkdocs_build_strict(tmp_path):
    """The site builds with no warning (broken links, nav, docstrings, public API not rendered or undocumented)."""
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                            cwd=ROOT, capture_output=True, text=True, env={**_env(), "NO_MKDOCS_2_WARNING": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "site" / "reference" / "cli" / "index.html").exists()


def _env() -> dict[str, str]:
    import os

    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}


def test_rst_in_docstrings_is_rendered_as_markdown():
    spec = importlib.util.spec_from_file_location("griffe_rst", DOCS / "hooks" / "griffe_rst.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    text = ("Test of :math:`d_z`, see :func:`~moeaudit.stats.tost_d` and :class:`Tost`.\n\n"
            "    .. math::\n\n        p = \\max(p_l, p_u),\n        q = 1\n\n    with se the error.\n")
    assert module.rst_to_markdown(text) == (
        "Test of \\(d_z\\), see `tost_d` and `Tost`.\n\n"
        "    \\[\n    p = \\max(p_l, p_u),\n    q = 1\n    \\]\n\n    with se the error.\n")
