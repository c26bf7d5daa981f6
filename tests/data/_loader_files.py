"""Small data files for the loader tests and the check that a DataError names its file, record and
field. Imported by the tests in this folder (pytest puts it on sys.path)."""

import json

import pytest

from distrag.config import DataConfig
from distrag.data import load_data
from distrag.errors import DataError


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


CORPUS = [{"id": "p1", "title": "Alpha", "text": "Alpha was founded in 1900."},
          {"id": "p2", "title": "Beta0", "text": "Beta0 is in Alpha."},
          {"id": 3, "text": "An untitled passage."}]

GOOD_Q = {"id": "q1", "question": "Q?", "answers": ["A"]}


def load(fmt, path, **kw):
    return load_data(DataConfig(format=fmt, path=str(path), **kw))


def raises_at(file, record, field, match=None):
    """pytest.raises for a DataError naming this file, record and field (in attributes and message)."""

    class _Check:
        def __enter__(self):
            self.ctx = pytest.raises(DataError, match=match)
            self.info = self.ctx.__enter__()
            return self.info

        def __exit__(self, *exc):
            handled = self.ctx.__exit__(*exc)
            err = self.info.value
            msg = str(err)
            assert str(file) in msg and err.file == str(file), msg
            if record is not None:
                assert err.record is not None and str(record) in str(err.record) and str(record) in msg, msg
            if field is not None:
                assert err.field == field and f"'{field}'" in msg, msg
            return handled

    return _Check()
