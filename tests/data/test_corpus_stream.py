"""corpus_stream: chunks cover every record in file order, offsets fetch the same records back, memory
stays bounded by the chunk while streaming, Parquet reads the same way, and bad lines name their row."""

from __future__ import annotations

import json
import tracemalloc

import numpy as np
import pytest

from distrag.data.corpus_stream import (
    JsonlPassageStream,
    PassageLookup,
    iter_parquet_chunks,
    iter_record_chunks,
    write_offsets,
)
from distrag.data.large_corpus import write_large_corpus
from distrag.data.parsing import load_corpus_jsonl
from distrag.errors import DataError


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("stream") / "corpus.jsonl"
    return write_large_corpus(path, 2_000, seed=3, median_words=20, n_words=2_000)


def test_chunks_cover_every_record_in_order(corpus_file):
    stream = JsonlPassageStream(corpus_file, chunk_passages=300)
    chunks = list(stream.chunks())
    assert [len(c.passages) for c in chunks] == [300] * 6 + [200]
    assert [c.start for c in chunks] == list(range(0, 2_000, 300))
    streamed = [p for c in chunks for p in c.passages]
    assert streamed == load_corpus_jsonl(corpus_file).passages
    assert np.array_equal(np.concatenate([c.offsets for c in chunks]), stream.offsets())
    assert chunks[0].texts()[0] == streamed[0].as_text()


def test_chunks_of_a_row_range_are_those_rows_with_their_global_positions(corpus_file, tmp_path):
    """A pool's index rank streams its part only; a bad line outside the range is never parsed."""
    stream = JsonlPassageStream(corpus_file, chunk_passages=300)
    every = [p for c in stream.chunks() for p in c.passages]
    chunks = list(stream.chunks((700, 1_350)))
    assert [c.start for c in chunks] == [700, 1_000, 1_300] and [len(c.passages) for c in chunks] == [300, 300, 50]
    assert [p for c in chunks for p in c.passages] == every[700:1_350]
    assert np.array_equal(np.concatenate([c.offsets for c in chunks]), stream.offsets()[700:1_350])
    broken = tmp_path / "broken.jsonl"
    broken.write_text("not json\n" + corpus_file.read_text())
    assert [p.id for c in JsonlPassageStream(broken).chunks((1, 3)) for p in c.passages] == [every[0].id, every[1].id]


def test_passages_fetched_by_offset_equal_the_file_records(corpus_file, tmp_path):
    offsets = write_offsets(JsonlPassageStream(corpus_file), tmp_path / "offsets.npy")
    lines = corpus_file.read_text().splitlines()
    rows = [1_999, 0, 17, 17, 1_000]
    with PassageLookup(corpus_file, offsets) as lookup:
        assert len(lookup) == 2_000
        got = lookup.get(np.asarray(rows))
        for r, p in zip(rows, got):
            rec = json.loads(lines[r])
            assert (p.id, p.title, p.text) == (rec["id"], rec["title"], rec["text"])
        with pytest.raises(IndexError, match="row 2000"):
            lookup.get([2_000])


def test_blank_lines_and_a_bom_are_skipped_and_offsets_still_point_at_records(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"id": 1, "text": "one"}\n\n  \n{"id": "b", "title": "T", "text": " two "}\n')
    stream = JsonlPassageStream(path)
    [chunk] = stream.chunks()
    assert [(p.id, p.title, p.text) for p in chunk.passages] == [("1", "", "one"), ("b", "T", "two")]
    with PassageLookup(path, write_offsets(stream, tmp_path / "o.npy")) as lookup:
        assert [p.id for p in lookup.get([1, 0])] == ["b", "1"]


def test_a_bad_record_names_the_file_and_row(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"id": "a", "text": "x"}\n{"id": "b"}\nnot json\n')
    with pytest.raises(DataError, match=r"record row 1: field 'text'"):
        list(JsonlPassageStream(path).chunks())
    path.write_text('{"id": "a", "text": "x"}\nnot json\n')
    with pytest.raises(DataError, match="record row 1"):
        list(JsonlPassageStream(path).chunks())


def test_streaming_memory_is_bounded_by_the_chunk_not_the_file(tmp_path):
    path = write_large_corpus(tmp_path / "big.jsonl", 50_000, seed=1, median_words=12, min_words=4, n_words=2_000,
                              chunk_passages=10_000)
    size = path.stat().st_size
    tracemalloc.start()
    try:
        rows = sum(len(c.passages) for c in JsonlPassageStream(path, chunk_passages=500).chunks())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert rows == 50_000
    assert peak < size / 10, f"peak {peak} bytes while streaming a {size}-byte file in chunks of 500"


def test_parquet_chunks_read_the_same_passages(tmp_path, corpus_file):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    passages = load_corpus_jsonl(corpus_file).passages[:250]
    table = pa.table({"id": [p.id for p in passages], "title": [p.title for p in passages],
                      "text": [p.text for p in passages]})
    pq.write_table(table, tmp_path / "c.parquet", row_group_size=100)
    chunks = list(iter_parquet_chunks(tmp_path / "c.parquet", chunk_passages=100))
    assert [c.start for c in chunks] == [0, 100, 200]
    assert [p for c in chunks for p in c.passages] == passages
    pq.write_table(pa.table({"id": ["a"]}), tmp_path / "bad.parquet")
    with pytest.raises(DataError, match="lacks column"):
        list(iter_parquet_chunks(tmp_path / "bad.parquet"))


def test_record_chunks_of_any_iterable_such_as_a_streamed_dataset():
    records = ({"id": i, "text": f"passage {i}"} for i in range(5))
    chunks = list(iter_record_chunks(records, source="hub:corpus", chunk_passages=2))
    assert [(c.start, [p.id for p in c.passages]) for c in chunks] == [(0, ["0", "1"]), (2, ["2", "3"]),
                                                                         (4, ["4"])]
    with pytest.raises(DataError, match="hub:corpus: record row 1: field 'text'"):
        list(iter_record_chunks([{"id": 1, "text": "x"}, {"id": 2}], source="hub:corpus"))
