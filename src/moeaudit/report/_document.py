"""A report as a list of blocks (headings, paragraphs, tables, figures), rendered to Markdown and to one
self-contained HTML file (figures embedded as base64 PNG, styles inline, no script, no external request)."""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Heading:
    text: str
    level: int = 2


@dataclass(frozen=True)
class Paragraph:
    text: str  # Markdown subset: **bold**, `code`


@dataclass(frozen=True)
class Table:
    caption: str
    columns: list[str]
    rows: list[list[str]]
    notes: str = ""
    align_left: int = 1  # the first ``align_left`` columns are labels


@dataclass(frozen=True)
class Figure:
    name: str  # file stem under figures/
    caption: str
    png: bytes = field(repr=False)
    pdf: bytes = field(default=b"", repr=False)


Block = Heading | Paragraph | Table | Figure


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def render_markdown(title: str, blocks: list[Block]) -> str:
    """Markdown with figures linked as ``figures/<name>.png``."""
    out = [f"# {title}", ""]
    for b in blocks:
        if isinstance(b, Heading):
            out += [f"{'#' * b.level} {b.text}", ""]
        elif isinstance(b, Paragraph):
            out += [b.text, ""]
        elif isinstance(b, Table):
            out += [f"**{b.caption}**", ""]
            out.append("| " + " | ".join(c.replace("|", "\\|") for c in b.columns) + " |")
            out.append("|" + "|".join(":---" if i < b.align_left else "---:" for i in range(len(b.columns))) + "|")
            for row in b.rows:
                out.append("| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |")
            out.append("")
            if b.notes:
                out += [f"*{b.notes}*", ""]
        elif isinstance(b, Figure):
            out += [f"![{b.caption}](figures/{b.name}.png)", "", f"*{b.caption}*", ""]
    return "\n".join(out).rstrip() + "\n"


_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;
color:#1a1a1a;line-height:1.45}
h1{border-bottom:2px solid #333;padding-bottom:.2em}h2{border-bottom:1px solid #ccc;padding-bottom:.15em;margin-top:2em}
table{border-collapse:collapse;margin:.6em 0 1.2em;font-size:.88em;font-variant-numeric:tabular-nums}
caption{text-align:left;font-weight:600;padding:.3em 0}
th,td{border-bottom:1px solid #ddd;padding:.25em .6em;text-align:right}th{background:#f3f3f3}
td.l,th.l{text-align:left}tr:hover td{background:#fafafa}
figure{margin:1em 0 2em}figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{font-size:.9em;color:#444}.notes{font-size:.85em;color:#555;margin-top:-.8em}
code{background:#f3f3f3;padding:0 .2em;border-radius:3px}nav ul{columns:2}
"""


def _inline(text: str) -> str:
    text = html.escape(text)
    text = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", text)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", text)


def render_html(title: str, blocks: list[Block]) -> str:
    """One self-contained HTML page."""
    body = []
    toc = []
    for b in blocks:
        if isinstance(b, Heading):
            anchor = _slug(b.text)
            if b.level == 2:
                toc.append(f'<li><a href="#{anchor}">{html.escape(b.text)}</a></li>')
            body.append(f'<h{b.level} id="{anchor}">{html.escape(b.text)}</h{b.level}>')
        elif isinstance(b, Paragraph):
            body.append(f"<p>{_inline(b.text)}</p>")
        elif isinstance(b, Table):
            cls = ['class="l"' if i < b.align_left else "" for i in range(len(b.columns))]
            head = "".join(f"<th {c}>{html.escape(col)}</th>" for c, col in zip(cls, b.columns))
            rows = "".join("<tr>" + "".join(f"<td {c}>{html.escape(str(v))}</td>" for c, v in zip(cls, row))
                           + "</tr>" for row in b.rows)
            body.append(f"<table><caption>{_inline(b.caption)}</caption><thead><tr>{head}</tr></thead>"
                        f"<tbody>{rows}</tbody></table>")
            if b.notes:
                body.append(f'<p class="notes">{_inline(b.notes)}</p>')
        elif isinstance(b, Figure):
            data = base64.b64encode(b.png).decode("ascii")
            body.append(f'<figure id="fig-{b.name}"><img alt="{html.escape(b.caption)}" '
                        f'src="data:image/png;base64,{data}"><figcaption>{_inline(b.caption)}</figcaption></figure>')
    nav = f"<nav><ul>{''.join(toc)}</ul></nav>" if toc else ""
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{_CSS}</style></head>'
            f"<body><h1>{html.escape(title)}</h1>{nav}{''.join(body)}</body></html>\n")


def figure_block(name: str, caption: str, fig) -> Figure:
    """A figure block holding the PNG (embedded in the HTML) and a vector PDF of the same matplotlib figure."""
    import io

    png, pdf = io.BytesIO(), io.BytesIO()
    fig.savefig(png, format="png", dpi=150)
    fig.set_layout_engine("none")  # keep the layout the PNG computed instead of solving it again for the PDF
    fig.savefig(pdf, format="pdf")
    fig.clear()
    return Figure(name, caption, png.getvalue(), pdf.getvalue())


def write_document(title: str, blocks: list[Block], out, stem: str = "report") -> dict:
    """Write ``<stem>.md``, ``<stem>.html`` and ``figures/<name>.png|pdf`` of ``blocks`` into the directory ``out``
    (every file atomically; figures staged and moved into place together).

    Returns:
        ``{"markdown": ..., "html": ..., "figures": ...}`` paths.
    """
    import shutil
    from pathlib import Path

    from moeaudit._atomic import atomic_write_bytes, atomic_write_text, translated

    out = Path(out)
    figures_dir = out / "figures"
    staging = out / f".tmp-figures-{stem}"
    shutil.rmtree(staging, ignore_errors=True)
    try:  # a failure (a full disk) leaves no staging directory behind
        with translated(staging / "figures"):
            staging.mkdir(parents=True)
        for block in blocks:
            if isinstance(block, Figure):
                atomic_write_bytes(staging / f"{block.name}.png", block.png)
                atomic_write_bytes(staging / f"{block.name}.pdf", block.pdf)
        for p in staging.iterdir():
            figures_dir.mkdir(parents=True, exist_ok=True)
            p.replace(figures_dir / p.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    md = atomic_write_text(out / f"{stem}.md", render_markdown(title, blocks))
    html_path = atomic_write_text(out / f"{stem}.html", render_html(title, blocks))
    return {"markdown": md, "html": html_path, "figures": figures_dir}
