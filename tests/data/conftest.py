"""Fixtures of the data tests."""

import pytest
from _loader_files import CORPUS, write_jsonl


@pytest.fixture
def corpus_file(tmp_path):
    return write_jsonl(tmp_path / "corpus.jsonl", CORPUS)
