"""Griffe extension (mkdocs.yml, mkdocstrings ``extensions``): the reStructuredText of moeaudit's docstrings as
Markdown, so the API reference shows formulas and names instead of raw roles.

* ``.. math::`` followed by an indented block becomes a display formula (``\\[ ... \\]``, typeset by MathJax
  through ``pymdownx.arithmatex``; without it the LaTeX source stays readable);
* ``:math:`x``` becomes an inline formula ``\\( x \\)``;
* ``:func:`~a.b.name```, ``:class:``, ``:mod:``, ``:data:``, ``:meth:``, ``:attr:``, ``:exc:`` become code,
  ``name`` (the last component when the target starts with ``~``, as Sphinx shows it).

The source's docstrings are not changed; only what mkdocstrings renders.
"""

from __future__ import annotations

import re
import textwrap

import griffe

_ROLE = re.compile(r":(?:func|class|mod|data|meth|attr|exc|obj):`(~?)([^`]+)`")
_INLINE_MATH = re.compile(r":math:`([^`]+)`")
_MATH_BLOCK = re.compile(r"^(?P<indent>[ \t]*)\.\. math::[ \t]*\n(?P<body>(?:[ \t]*\n)*(?:(?P=indent)[ \t]+\S.*\n?(?:[ \t]*\n)*)+)",
                         re.M)


def _role(match: re.Match) -> str:
    target = match.group(2)
    return f"`{target.rsplit('.', 1)[-1] if match.group(1) else target}`"


def _math_block(match: re.Match) -> str:
    indent = match.group("indent")
    body = textwrap.dedent(match.group("body")).strip("\n")
    lines = [indent + r"\[", *(indent + line if line else "" for line in body.split("\n")), indent + r"\]"]
    return "\n".join(lines) + "\n\n"


def rst_to_markdown(text: str) -> str:
    """Rewrite the reStructuredText roles and math of a docstring as Markdown (see the module docstring)."""
    text = _MATH_BLOCK.sub(_math_block, text)
    text = _INLINE_MATH.sub(lambda m: rf"\({m.group(1)}\)", text)
    return _ROLE.sub(_role, text)


class RstToMarkdown(griffe.Extension):
    """Rewrite every loaded docstring with :func:`rst_to_markdown` before mkdocstrings parses it."""

    def on_object(self, *, obj: griffe.Object, loader: griffe.GriffeLoader, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = rst_to_markdown(obj.docstring.value)
