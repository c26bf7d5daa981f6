"""``load_data`` (distrag/data/__init__.py): each format goes to its loader with the config's settings."""

from __future__ import annotations

import typing

import pytest

import distrag.data.hotpotqa
import distrag.data.jsonl
import distrag.data.popqa
from distrag.config import DataConfig
from distrag.data import FORMATS, load_data
from distrag.data.disk_corpus import CorpusOpener
from distrag.errors import DataError


def test_formats_are_the_config_choices():
    assert set(FORMATS) == set(typing.get_args(DataConfig.model_fields["format"].annotation))


@pytest.mark.parametrize("fmt, module, fn", [
    ("hotpotqa", distrag.data.hotpotqa, "load_hotpotqa"),
    ("popqa", distrag.data.popqa, "load_popqa"),
])
def test_hub_capable_formats_dispatch_with_every_setting(monkeypatch, fmt, module, fn):
    calls = []
    monkeypatch.setattr(module, fn, lambda *a, **k: calls.append((a, k)) or "loaded")
    cfg = DataConfig(format=fmt, path="q.json", corpus_path="c.jsonl", max_questions=7, hub_split="train")
    assert load_data(cfg) == "loaded"
    assert calls == [(("q.json",), {"corpus_path": "c.jsonl", "max_questions": 7, "hub_split": "train",
                                     "open_corpus": CorpusOpener("auto", None, True)})]


def test_jsonl_dispatches_with_its_corpus(monkeypatch):
    calls = []
    monkeypatch.setattr(distrag.data.jsonl, "load_jsonl", lambda *a, **k: calls.append((a, k)) or "loaded")
    assert load_data(DataConfig(format="jsonl", path="q.jsonl", corpus_path="c.jsonl")) == "loaded"
    assert calls == [(("q.jsonl", "c.jsonl"), {"max_questions": None, "open_corpus": CorpusOpener("auto", None, True)})]


def test_the_corpus_opener_carries_the_switch_the_side_file_folder_and_the_writer(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(distrag.data.jsonl, "load_jsonl", lambda *a, **k: calls.append(k["open_corpus"]))
    load_data(DataConfig(format="jsonl", path="q.jsonl", corpus_path="c.jsonl", corpus_on_disk=True),
              corpus_cache=tmp_path, writer=False)
    assert calls == [CorpusOpener(True, tmp_path, False)]


def test_unvalidated_configs_get_data_errors():
    # DataConfig validation forbids these; configs built without validation still fail clearly
    with pytest.raises(DataError, match="data.path is required"):
        load_data(DataConfig.model_construct(format="popqa", path=None, corpus_path=None))
    with pytest.raises(DataError, match="needs data.corpus_path") as e:
        load_data(DataConfig.model_construct(format="jsonl", path="q.jsonl", corpus_path=None))
    assert e.value.field == "data.corpus_path"
    with pytest.raises(DataError, match="unknown data format 'csv'; expected one of synthetic, hotpotqa"):
        load_data(DataConfig.model_construct(format="csv", path="q.csv", corpus_path=None))
