"""MkDocs hooks of moeaudit's documentation site (mkdocs.yml ``hooks:``).

* ``<!-- moeaudit-cli -->`` in a page is replaced by the command-line reference, generated at build time from the
  typer application (``typer.main.get_command(app)``): every command's usage, help text, arguments and options with
  their defaults, exactly what ``moeaudit COMMAND --help`` prints.
* Every public name of ``moeaudit.__all__`` must be rendered (``::: module.name``) on some page, under the module
  that defines it (``moeaudit._EXPORTS``), and ``moeaudit.stats`` must be rendered whole; a missing one is a warning,
  which ``mkdocs build --strict`` turns into a failed build.
"""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path

_SRC = Path(__file__).resolve().parents[2] / "src"
if str(_SRC) not in sys.path:  # document this checkout, not another installed copy
    sys.path.insert(0, str(_SRC))

log = logging.getLogger("mkdocs.hooks.moeaudit")
_CLI_MARKER = "<!-- moeaudit-cli -->"
_DIRECTIVE = re.compile(r"^:::\s+(\S+)", re.M)
_rendered: set[str] = set()


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", r"\|")


def _command_markdown(group, name: str) -> str:
    command = group.commands[name]
    root = group.context_class(group, info_name="moeaudit")
    ctx = command.context_class(command, info_name=name, parent=root)
    usage = command.get_usage(ctx).removeprefix("Usage: ")
    lines = [f"## `moeaudit {name}`", "", "```text", usage, "```", ""]
    if command.help:
        help_text = command.help.replace("\b\n", "")
        lines += [help_text.strip(), ""]
    # typer ships its own copy of click, so parameters are told apart by kind, not by click's classes
    arguments = [p for p in command.params if p.param_type_name == "argument"]
    options = [p for p in command.params if p.param_type_name == "option" and not getattr(p, "hidden", False)]
    if arguments:
        lines += ["| argument | description |", "|---|---|"]
        for p in arguments:
            record = p.get_help_record(ctx)
            meta, text = record if record else (p.make_metavar(ctx), "")
            lines.append(f"| `{_cell(meta)}` | {_cell(text)} |")
        lines.append("")
    if options:
        lines += ["| option | description |", "|---|---|"]
        for p in options:
            record = p.get_help_record(ctx)
            if record is None:
                continue
            lines.append(f"| `{_cell(record[0])}` | {_cell(record[1])} |")
        lines.append("")
    return "\n".join(lines)


def cli_markdown() -> str:
    """The reference of every ``moeaudit`` command, as Markdown, from the typer application."""
    import typer

    from moeaudit.cli import app

    group = typer.main.get_command(app)
    intro = [f"`moeaudit --help`: {group.help.strip()}", "", "| command | summary |", "|---|---|"]
    for name, command in group.commands.items():
        summary = command.get_short_help_str(limit=200)
        intro.append(f"| [`{name}`](#moeaudit-{name}) | {_cell(summary)} |")
    return "\n".join([*intro, "", *(_command_markdown(group, name) for name in group.commands)])


def on_page_markdown(markdown: str, page, config, files) -> str:
    _rendered.update(_DIRECTIVE.findall(markdown))
    if _CLI_MARKER in markdown:
        markdown = markdown.replace(_CLI_MARKER, cli_markdown())
    return markdown


def on_pre_build(config) -> None:
    _rendered.clear()


def missing_api(rendered: set[str]) -> list[str]:
    """Public names of ``moeaudit`` that no ``::: module.name`` directive renders (``moeaudit.stats`` as a whole)."""
    import moeaudit

    wanted = [f"{module}.{name}" for name, module in sorted(moeaudit._EXPORTS.items())] + ["moeaudit.stats"]
    return [path for path in wanted if path not in rendered]


def undocumented() -> list[str]:
    """Public objects without a docstring: each name of ``moeaudit.__all__`` and ``moeaudit.stats.__all__``, and
    the public methods and nested classes of the public classes (read statically by griffe, as mkdocstrings does)."""
    import griffe

    import moeaudit
    import moeaudit.stats

    package = griffe.load("moeaudit", search_paths=[str(_SRC)], resolve_aliases=True, resolve_external=False)
    paths = [f"{module}.{name}" for name, module in moeaudit._EXPORTS.items()]
    paths += [f"moeaudit.stats.{name}" for name in moeaudit.stats.__all__]
    missing = []
    for path in sorted(paths):
        obj = package[path.removeprefix("moeaudit.")]
        obj = obj.final_target if obj.is_alias else obj
        if not obj.docstring:
            missing.append(path)
        if obj.is_class:
            for name, member in obj.all_members.items():
                member = member.final_target if member.is_alias else member
                if not name.startswith("_") and (member.is_function or member.is_class) and not member.docstring:
                    missing.append(f"{path}.{name}")
    return missing


def on_post_build(config) -> None:
    for path in missing_api(_rendered):
        log.warning("the public API %s is not rendered on any page (add '::: %s' to docs/reference/)", path, path)
    for path in undocumented():
        log.warning("the public object %s has no docstring", path)
