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
# scheme://userinfo@ : userinfo runs to the LAST "@" before the path (a raw "@" in a password is masked too)
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^/\s'\"]+)@")


def mask_credentials(text: str) -> str:
    """``text`` with the credentials of every URL in it replaced by ``***``."""
    return _USERINFO.sub(lambda m: f"{m.group('scheme')}{MASK}@", text)


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
