"""Credential masking: the one function, the tree and exception helpers, and the log filter."""

from __future__ import annotations

import logging

import pytest

from distrag.redaction import CredentialFilter, mask_credentials, mask_tree, masked_exception


@pytest.mark.parametrize("text,masked", [
    ("http://alice:tok@host:5000", "http://***@host:5000"),
    ("https://token@host/api", "https://***@host/api"),
    ("postgresql://u:p@db:5432/mlflow", "postgresql://***@db:5432/mlflow"),
    ("http://u:p@ss@host/x?mail=a@b", "http://***@host/x?mail=a@b"),  # a raw "@" in the password
    ("API request to 'http://u:p@h:9/api' failed; retry http://v:q@h2", "API request to 'http://***@h:9/api' failed; "
                                                                        "retry http://***@h2"),
    ("sqlite:////tmp/mlflow.db", "sqlite:////tmp/mlflow.db"),
    ("file:///data/x@y.txt", "file:///data/x@y.txt"),
    ("mail me at user@example.com", "mail me at user@example.com"),
])
def test_mask_credentials(text, masked):
    assert mask_credentials(text) == masked


def test_mask_tree_and_exceptions():
    tree = {"tracking": {"uri": "http://u:p@h", "n": 3, "tags": ["http://a:b@c", None]}, "ok": True}
    assert mask_tree(tree) == {"tracking": {"uri": "http://***@h", "n": 3, "tags": ["http://***@c", None]}, "ok": True}
    assert tree["tracking"]["uri"] == "http://u:p@h"  # a copy

    class WithMessage(Exception):
        def __init__(self, message):
            super().__init__(message)
            self.message = message

    e = masked_exception(WithMessage("request to http://u:p@h failed"))
    assert isinstance(e, WithMessage) and str(e) == e.message == "request to http://***@h failed"
    assert masked_exception(OSError(2, "http://u:p@h")).args == (2, "http://***@h")


def test_the_log_filter_masks_messages_arguments_and_exceptions(caplog):
    logger = logging.getLogger("distrag.test_redaction")
    uri = "http://u:" + "secret" + "@h:1"  # (a traceback shows source lines: keep the literal out of them)
    handler_filter = CredentialFilter()
    caplog.handler.addFilter(handler_filter)
    try:
        with caplog.at_level(logging.INFO, logger="distrag.test_redaction"):
            logger.info("tracking at %s", uri)
            try:
                raise RuntimeError(f"cannot reach {uri}")
            except RuntimeError:
                logger.exception("failed")
    finally:
        caplog.handler.removeFilter(handler_filter)
    assert "secret" not in caplog.text and "http://***@h:1" in caplog.text
    assert caplog.records[0].getMessage() == "tracking at http://***@h:1"


# ----------------------------------------------------------------------------------------------
# issue 19, item 7: masking parses the URI's authority, so every character legal in userinfo is masked


USERINFO_CHARS = ("ABCXYZabcxyz0189" + "-._~" + "!$&'()*+,;=" + ":" + "%27%40%2F")
"""RFC 3986 userinfo: unreserved, sub-delims, ":" and percent-encoded octets."""


@pytest.mark.parametrize("char", sorted(set(USERINFO_CHARS)) + ["%27", USERINFO_CHARS])
@pytest.mark.parametrize("context", ["{}", "'{}'", '"{}"', "repr", "({!r}, 'x@y')", "see {}/api/2.0/runs?x=1 now",
                                     "API request to {}/api failed, retrying {}", '{{"uri": "{}"}}'])
def test_every_character_legal_in_userinfo_is_masked_in_any_quoting(char, context):
    """Before: the regex stopped at quotes, so ``http://bob:pa'ss@host`` was printed as it was, in logs,
    MLflow params, ``distrag report`` and the tracker probe's error (issue 19)."""
    password = f"pa{char}ss"
    uri = f"http://bob:{password}@mlflow.internal:5000"
    text = repr(uri) if context == "repr" else context.format(uri, uri)
    masked = mask_credentials(text)
    assert password not in masked and "bob" not in masked, masked
    assert "***@mlflow.internal:5000" in masked


def test_masking_keeps_what_follows_the_credentials():
    assert mask_credentials("to 'http://bob:pa'ss@h:5/api' failed") == "to 'http://***@h:5/api' failed"
    assert mask_credentials('uri="http://b:p\'q@h:5" ok') == 'uri="http://***@h:5" ok'
    assert mask_credentials("http://b:p@h,http://c:q@i/") == "http://***@h,http://***@i/"
