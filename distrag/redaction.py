"""Credentials kept out of logs, error messages, MLflow params and files written to disk.

A tracking URI may carry credentials (``http://user:token@host``, ``postgresql://user:pw@db/mlflow``).
:func:`mask_credentials` is the one function that hides them: the user-info part of every URL in a text
becomes ``***`` (``http://***@host``). Everything that shows or stores text that can hold a URI goes
through it: :func:`mask_tree` for configurations written to files or logged as params,
:class:`CredentialFilter` for log records, :func:`masked_exception` for errors raised by libraries that
quote the URI (MLflow's "API request to http://user:token@host/... failed").
"""

from __future__ import annotations

import logging
import re
from typing import Any

MASK = "***"
_SCHEME = re.compile(r"\b[A-Za-z][A-Za-z0-9+.\-]*://")
_AUTHORITY_END = re.compile(r"[/?#\s]")
"""RFC 3986: the authority (``userinfo@host:port``) ends at "/", "?" or "#"; a URI in a text ends at whitespace."""


def mask_credentials(text: str) -> str:
    """``text`` with the credentials of every URL in it replaced by ``***``.

    Parsed, not matched: after each ``scheme://`` the authority runs to the first "/", "?", "#" or
    whitespace, and everything before its LAST "@" is the userinfo. So every character legal in a userinfo
    (quotes, ``!$&'()*+,;=:``, percent escapes; a raw "@" too) is masked, whatever quotes the URI in the
    text: a regex that stopped at quotes printed ``http://bob:pa'ss@host`` whole (issue 19). Where the URI
    is not followed by one of those characters (``('http://h:1','a@b')``), more is masked, never less."""
    out, pos = [], 0
    while (scheme := _SCHEME.search(text, pos)) is not None:
        start = scheme.end()
        end = _AUTHORITY_END.search(text, start)
        at = text.rfind("@", start, end.start() if end else len(text))
        if at < 0:
            out.append(text[pos:start])
            pos = start
        else:
            out.append(text[pos:start] + MASK)
            pos = at
    out.append(text[pos:])
    return "".join(out)


def mask_tree(tree: Any) -> Any:
    """A copy of a JSON-like tree (dicts, lists, strings, numbers) with :func:`mask_credentials` applied
    to every string."""
    if isinstance(tree, str):
        return mask_credentials(tree)
    if isinstance(tree, dict):
        return {k: mask_tree(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(mask_tree(v) for v in tree)
    return tree


def masked_exception(e: BaseException) -> BaseException:
    """``e`` with credentials masked in its message (its arguments, and MLflow's ``message`` attribute),
    changed in place and returned, so the type callers catch stays the same. Raise it ``from None``: the
    chained exceptions it came from may quote the URI too."""
    e.args = tuple(mask_credentials(a) if isinstance(a, str) else a for a in e.args)
    if isinstance(getattr(e, "message", None), str):
        e.message = mask_credentials(e.message)
    return e


class CredentialFilter(logging.Filter):
    """A logging filter (put it on a handler) that masks credentials in every record it passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = mask_credentials(message)
        if masked != message:
            record.msg, record.args = masked, None
        if record.exc_info and record.exc_info[1] is not None:
            masked_exception(record.exc_info[1])
            record.exc_text = None
        return True
