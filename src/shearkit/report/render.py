"""A small document model (sections of text, tables, figures, code) and its two renderings:
markdown with PNG files beside it, and one self-contained HTML page with the PNGs inlined."""
from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass, field
from typing import Any, Union


@dataclass
class Text:
    text: str


@dataclass
class Table:
    columns: list[str]
    rows: list[list[Any]]
    name: str = ""  # a CSS class / anchor, e.g. "metrics"


@dataclass
class Figure:
    name: str  # file stem, e.g. "plan"
    caption: str
    png: bytes


@dataclass
class Code:
    text: str
    lang: str = ""


Block = Union[Text, Table, Figure, Code]


@dataclass
class Section:
    title: str
    blocks: list[Block] = field(default_factory=list)

    @property
    def anchor(self) -> str:
        return re.sub(r"[^a-z0-9]+", "-", self.title.lower()).strip("-")


@dataclass
class Document:
    title: str
    subtitle: str
    sections: list[Section]

    def figures(self) -> list[Figure]:
        return [b for s in self.sections for b in s.blocks if isinstance(b, Figure)]


def fmt(x: Any) -> str:
    """Cell text: floats to 4 significant digits, large integers with separators, None as a dash."""
    if x is None:
        return "–"
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, float):
        if x != x:
            return "nan"
        return f"{x:.4g}" if abs(x) < 1e6 else f"{x:,.0f}"
    if isinstance(x, int):
        return f"{x:,}"
    return str(x)


# -- markdown ------------------------------------------------------------------------------------

def md_cell(x: Any) -> str:
    """A markdown table cell: formatted, pipes escaped, on one line."""
    return fmt(x).replace("|", "\\|").replace("\n", " ")


def to_markdown(doc: Document, figure_dir: str = "figures") -> str:
    """Markdown text; figures are referenced as `<figure_dir>/<name>.png` (written by the caller)."""
    out = [f"# {doc.title}", "", doc.subtitle, ""]
    out += [f"- [{s.title}](#{s.anchor})" for s in doc.sections] + [""]
    for s in doc.sections:
        out += [f"## {s.title}", ""]
        for b in s.blocks:
            if isinstance(b, Text):
                out += [b.text, ""]
            elif isinstance(b, Table):
                out.append("| " + " | ".join(md_cell(c) for c in b.columns) + " |")
                out.append("|" + "|".join("---" for _ in b.columns) + "|")
                out += ["| " + " | ".join(md_cell(c) for c in r) + " |" for r in b.rows]
                out.append("")
            elif isinstance(b, Figure):
                out += [f"![{b.caption}]({figure_dir}/{b.name}.png)", "", f"*{b.caption}*", ""]
            elif isinstance(b, Code):
                out += [f"```{b.lang}", b.text.rstrip("\n"), "```", ""]
    return "\n".join(out).rstrip() + "\n"


# -- HTML ----------------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2rem auto;max-width:64rem;
     padding:0 1rem;color:#222;line-height:1.45}
h1{margin-bottom:.2rem}.subtitle{color:#666;margin-top:0}
nav ul{columns:2;padding-left:1.2rem}
table{border-collapse:collapse;margin:.6rem 0 1.2rem;font-size:.9rem}
th,td{border:1px solid #ccc;padding:.25rem .6rem;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
tr:nth-child(even) td{background:#fafafa}
figure{margin:1rem 0}figure img{max-width:100%;border:1px solid #ddd}
figcaption{color:#555;font-size:.9rem}
pre{background:#f6f8fa;padding:.8rem;overflow-x:auto;font-size:.85rem}
code{background:#f3f3f3;padding:0 .2rem;border-radius:3px;font-size:.9em}pre code{background:none;padding:0}
"""
_CODE_SPAN = re.compile(r"`([^`]+)`")


def inline_html(text: str) -> str:
    """Escaped HTML of a line of prose, with markdown's `code` spans rendered as <code> (the same text
    reads the same in report.md and report.html)."""
    out, pos = [], 0
    for m in _CODE_SPAN.finditer(text):
        out += [html.escape(text[pos:m.start()]), f"<code>{html.escape(m.group(1))}</code>"]
        pos = m.end()
    return "".join(out) + html.escape(text[pos:])


def to_html(doc: Document) -> str:
    """One HTML page with every figure inlined as a base64 PNG (no external files or scripts)."""
    e = html.escape
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             f"<title>{e(doc.title)}</title><style>{_CSS}</style></head><body>",
             f"<h1>{e(doc.title)}</h1>", f'<p class="subtitle">{inline_html(doc.subtitle)}</p>', "<nav><ul>"]
    parts += [f'<li><a href="#{s.anchor}">{e(s.title)}</a></li>' for s in doc.sections]
    parts.append("</ul></nav>")
    for s in doc.sections:
        parts.append(f'<section id="{s.anchor}"><h2>{e(s.title)}</h2>')
        for b in s.blocks:
            if isinstance(b, Text):
                parts.append(f"<p>{inline_html(b.text)}</p>")
            elif isinstance(b, Table):
                cls = f' class="{e(b.name)}"' if b.name else ""
                parts.append(f"<table{cls}><thead><tr>" + "".join(f"<th>{inline_html(fmt(c))}</th>"
                                                                  for c in b.columns) + "</tr></thead><tbody>")
                parts += ["<tr>" + "".join(f"<td>{inline_html(fmt(c))}</td>" for c in r) + "</tr>" for r in b.rows]
                parts.append("</tbody></table>")
            elif isinstance(b, Figure):
                data = base64.b64encode(b.png).decode("ascii")
                parts.append(f'<figure id="fig-{e(b.name)}"><img alt="{e(b.caption.replace("`", ""))}" '
                             f'src="data:image/png;base64,{data}"><figcaption>{inline_html(b.caption)}</figcaption>'
                             "</figure>")
            elif isinstance(b, Code):
                parts.append(f"<pre><code>{e(b.text)}</code></pre>")
        parts.append("</section>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
