"""Texts of recorded runs written into each format of the report as plain text, never as that format's markup.

A strategy label, a dataset, a model name, a bundle path or a decoder comes from an MLflow run that a user or
another writer may have created, so any string can arrive. Each format has one function here, applied to every
data-derived text on its way in (the formats' own fixed texts are written as they are):

* the terminal (rich): :func:`rich_text`, a ``Text`` object (no markup such as ``[/bold]``, no emoji codes such
  as ``:smile:``, no highlighting);
* the plots (matplotlib): :func:`mpl_text` (every ``$`` escaped: no mathtext); the plots are drawn with
  ``text.usetex`` off whatever a matplotlibrc says (:mod:`distrag.reporting.plots`);
* ``table.md``: :func:`md_text` for a cell or a line (no cell separator, HTML, line break, link or emphasis)
  and :func:`md_url` for a link's destination;
* ``table.csv``: :func:`csv_cell` (no spreadsheet formula: OWASP's CSV-injection rule);
* ``report.html``: :func:`html.escape`, in :mod:`distrag.reporting.html_page`.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import quote

# ----------------------------------------------------------------------------------------------
# the terminal (rich)


def rich_text(text: Any, style: str = ""):
    """``text`` as a rich ``Text``: shown as written (rich parses markup and emoji codes in a ``str`` only)."""
    from rich.text import Text

    return Text(str(text), style=style)


# ----------------------------------------------------------------------------------------------
# the plots (matplotlib)


def mpl_text(text: Any) -> str:
    """``text`` for a matplotlib label, title or annotation: every ``$`` escaped, so no part of it is parsed as
    mathtext (``$x_$`` would fail to draw, ``$x$`` would be drawn in italics, ``a\\$b`` without its backslash)."""
    return str(text).replace("$", r"\$")


# ----------------------------------------------------------------------------------------------
# table.md (GitHub-flavoured Markdown)

_LINE_BREAK = re.compile(r"\r\n|[\r\n\v\f\x1c-\x1e\x85\u2028\u2029]")
_MD_PUNCTUATION = re.compile(r"[\\`*~|]|\](?=\()|(?<![^\W_])_|_(?![^\W_])")
"""Backslash-escaped: the escape character itself, code spans, emphasis and strikethrough, the table's cell
separator, the ``](`` of an inline link or image (the file defines no link references, and ``<`` cannot make an
autolink: brackets elsewhere stay as they are, ``[95% CI]``), an underscore only where it could start or end
emphasis (``gen_ft`` keeps its own)."""
_MD_HTML = re.compile(r"[<>]|&(?=#[0-9]+;|#[xX][0-9a-fA-F]+;|[A-Za-z][A-Za-z0-9]*;)")
"""As entities: ``<`` and ``>`` (no HTML tag, no autolink), and an ``&`` that would start an entity (``&lt;``
stays those four characters; ``x & y`` needs nothing)."""
_ENTITY = {"&": "&amp;", "<": "&lt;", ">": "&gt;"}


def md_text(text: Any) -> str:
    """``text`` as a ``table.md`` cell or line, shown as written: line breaks become spaces (a row stays one
    line), ``|`` cannot end the cell, ``<`` and ``>`` are entities (no HTML) and so is an ``&`` that would
    start one, and links, code spans and emphasis are escaped."""
    one_line = _LINE_BREAK.sub(" ", str(text))
    escaped = _MD_PUNCTUATION.sub(lambda m: "\\" + m.group(0), one_line)
    return _MD_HTML.sub(lambda m: _ENTITY[m.group(0)], escaped)


def md_url(path: Any) -> str:
    """A path as a Markdown link destination: percent-encoded (spaces, parentheses, ``|``, ``<`` and line breaks
    included), ``/`` kept."""
    return quote(str(path), safe="/")


# ----------------------------------------------------------------------------------------------
# table.csv

_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
"""What makes a spreadsheet read a cell as a formula (OWASP, CSV injection)."""


def csv_cell(value: Any) -> Any:
    """A ``table.csv`` value: text that a spreadsheet would run as a formula gets a leading ``'`` (OWASP's rule);
    numbers (-0.5 stays a number) and every other text are left as they are."""
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value
