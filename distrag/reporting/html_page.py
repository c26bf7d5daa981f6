"""The report as one self-contained HTML page: heading, the table with its caption, the plots.

The page references nothing outside itself (no scripts, fonts, style sheets or URLs): the plots are
inlined as base64 PNG ``data:`` URIs and the style sheet is inline, so ``report.html`` can be mailed,
attached to an MLflow run and opened from its artifact view, or opened from a cluster's shared disk.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 2em auto; max-width: 1200px;
       padding: 0 1em; color: #222; }
h1 { font-size: 1.4em; margin-bottom: 0.2em; }
p.meta { color: #555; margin: 0.2em 0; font-size: 0.92em; }
table { border-collapse: collapse; margin: 1.2em 0; font-size: 0.88em; }
caption { caption-side: bottom; text-align: left; color: #555; padding-top: 0.6em; max-width: 1100px; }
th, td { border-bottom: 1px solid #ddd; padding: 0.3em 0.6em; white-space: nowrap; }
th { background: #f4f4f4; text-align: left; white-space: normal; vertical-align: bottom; }
div.wide { overflow-x: auto; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 1.5em 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.9em; }
code { background: #f4f4f4; padding: 0 0.2em; }
"""


@dataclass
class Plot:
    """A plot of the page: its PNG bytes, its title (alt text) and a caption."""

    title: str
    png: bytes
    caption: str = ""


def data_uri(png: bytes) -> str:
    """``data:image/png;base64,...`` of a PNG."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def report_page(*, title: str, meta: Sequence[str], headers: Sequence[str], cells: Sequence[Sequence[str]],
                numeric: Sequence[bool], caption: str, figures: Sequence[Plot], notes: Sequence[str] = ()) -> str:
    """The HTML text: ``title``, ``meta`` lines under it, the table (``headers``, ``cells`` row by row;
    ``numeric[i]``: right-align column i) with ``caption``, the ``figures``, then ``notes``. Every text is
    escaped."""
    out = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           f"<title>{escape(title)}</title>", f"<style>{_STYLE}</style>", "</head>", "<body>",
           f"<h1>{escape(title)}</h1>"]
    out += [f'<p class="meta">{escape(line)}</p>' for line in meta]
    out += ['<div class="wide">', "<table>", f"<caption>{escape(caption)}</caption>" if caption else "", "<thead><tr>"]
    out += [f"<th>{escape(h)}</th>" for h in headers]
    out += ["</tr></thead>", "<tbody>"]
    for row in cells:
        tds = "".join(f'<td class="num">{escape(c)}</td>' if num else f"<td>{escape(c)}</td>"
                      for c, num in zip(row, numeric))
        out.append(f"<tr>{tds}</tr>")
    out += ["</tbody>", "</table>", "</div>"]
    for f in figures:
        out += ["<figure>", f'<img src="{data_uri(f.png)}" alt="{escape(f.title)}">',
                f"<figcaption>{escape(f.caption or f.title)}</figcaption>", "</figure>"]
    out += [f'<p class="meta">{escape(n)}</p>' for n in notes]
    out += ["</body>", "</html>"]
    return "\n".join(x for x in out if x) + "\n"
