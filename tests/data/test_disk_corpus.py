"""DiskCorpus: the same passages, rows, ids and fingerprint as the in-memory corpus of the same file, side files
built once per file version, ids told apart when their hashes collide, the in-memory loader's errors for bad
records and duplicate ids, waiting for another process' side files, and when the switch reads from disk."""

from __future__ import annotations

import json
import os
import tracemalloc

import numpy as np
import pytest
from _loader_files import CORPUS, raises_at, write_jsonl

import distrag.data.disk_corpus as dc
from distrag.config import DataConfig
from distrag.data import load_data
from distrag.data.disk_corpus import CorpusOpener, DiskCorpus, reads_from_disk, side_folder
from distrag.data.large_corpus import write_large_corpus
from distrag.data.parsing import load_corpus_jsonl
from distrag.data.records import Corpus
from distrag.errors import DataError


@pytest.fixture(scope="module")
def big_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("disk_corpus") / "corpus.jsonl"
    return write_large_corpus(path, 3_000, seed=5, median_words=12, n_words=800)


def test_the_same_passages_rows_ids_and_fingerprint_as_in_memory(big_file, tmp_path):
    disk, mem = DiskCorpus.open(big_file, tmp_path), load_corpus_jsonl(big_file)
    assert disk.on_disk and not mem.on_disk
    assert len(disk) == len(mem) == 3_000
    assert disk.fingerprint() == mem.fingerprint()  # so a cached index serves both
    rows = [0, 2_999, 17, 17, 1_500]
    assert disk.take(rows) == mem.take(rows) == [mem.passages[r] for r in rows]
    assert disk[-1] == mem[-1] and disk[3:6] == mem[3:6]
    assert disk.texts([4, 2]) == [mem[4].as_text(), mem[2].as_text()]
    assert all(disk.position(mem[r].id) == r for r in range(0, 3_000, 7))
    assert "p42" in disk and "p3000" not in disk and 42 not in disk
    with pytest.raises(KeyError):
        disk.position("p3000")
    with pytest.raises(IndexError, match="row 3000"):
        disk.passage(3_000)
    chunks = list(disk.chunks(1_000))
    assert [c.start for c in chunks] == [0, 1_000, 2_000]
    assert [p for c in chunks for p in c.passages] == mem.passages == list(disk)
    with pytest.raises(ValueError, match="every text in memory"):
        disk.texts()


def test_side_files_are_small_arrays_built_once_per_version_of_the_file(big_file, tmp_path, monkeypatch):
    disk = DiskCorpus.open(big_file, tmp_path / "cache")
    folder = side_folder(tmp_path / "cache", big_file)
    assert disk.folder == folder and folder.parent == tmp_path / "cache"
    sizes = {f.name: f.stat().st_size for f in folder.iterdir()}
    assert sizes.keys() == {"offsets.int64", "id_hash.uint64", "id_row.int64", "corpus.json"}
    assert all(sizes[n] == 8 * 3_000 for n in ("offsets.int64", "id_hash.uint64", "id_row.int64"))
    meta = json.loads((folder / "corpus.json").read_text())
    assert (meta["rows"], meta["size"], meta["fingerprint"]) == (3_000, big_file.stat().st_size, disk.fingerprint())
    monkeypatch.setattr(dc, "_build", lambda *a: pytest.fail("side files built twice"))
    assert DiskCorpus.open(big_file, tmp_path / "cache").fingerprint() == disk.fingerprint()
    monkeypatch.undo()

    edited = tmp_path / "edited.jsonl"  # a file edited after its side files were built gets new ones
    write_jsonl(edited, CORPUS)
    first = DiskCorpus.open(edited, tmp_path / "cache").folder
    write_jsonl(edited, CORPUS[:2])
    os.utime(edited, ns=(1, 1))  # a new mtime even on coarse clocks
    second = DiskCorpus.open(edited, tmp_path / "cache")
    assert second.folder != first and not first.exists() and len(second) == 2
    assert folder.exists()  # another file's side files stay


def test_ids_that_share_a_hash_are_told_apart_by_their_records(big_file, tmp_path, monkeypatch):
    few = lambda ids: np.asarray([len(i) % 3 for i in ids], dtype=np.uint64)  # 3 hash values for 3,000 ids
    monkeypatch.setattr(dc, "id_hashes", few)
    disk, mem = DiskCorpus.open(big_file, tmp_path), load_corpus_jsonl(big_file)
    assert all(disk.position(mem[r].id) == r for r in (0, 9, 99, 999, 2_999))
    assert "p9999" not in disk
    dup = tmp_path / "dup.jsonl"
    dup.write_text(big_file.read_text() + json.dumps({"id": "p77", "text": "again"}) + "\n")
    with raises_at(dup, "line 3001", "id", match=r"duplicate passage id 'p77' \(first at line 78\)"):
        DiskCorpus.open(dup, tmp_path)


def test_bad_records_and_duplicates_are_the_in_memory_loaders_errors(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"id": "a", "text": "x"}\n\n{"id": "b", "text": "y"}\n{"id": "a", "text": "z"}\n')
    for load in (load_corpus_jsonl, lambda p: DiskCorpus.open(p, tmp_path / "cache")):
        with raises_at(path, "line 4", "id", match=r"duplicate passage id 'a' \(first at line 1\)"):
            load(path)
    path.write_text('{"id": "a", "text": "x"}\n{"id": "b", "title": 3, "text": "y"}\n')
    for load in (load_corpus_jsonl, lambda p: DiskCorpus.open(p, tmp_path / "cache")):
        with raises_at(path, "line 2", "title", match="expected a string"):
            load(path)
    path.write_text('{"id": "a", "text": "x"}\nnot json\n')
    with raises_at(path, "line 2", None, match="invalid JSON"):
        DiskCorpus.open(path, tmp_path / "cache")
    path.write_text("\n\n")
    with raises_at(path, None, None, match="corpus is empty"):
        DiskCorpus.open(path, tmp_path / "cache")
    assert not list((tmp_path / "cache").glob("*/corpus.json"))  # nothing half-built is left to be trusted
    path.write_text('{"id": "b", "text": "  y  "}\n')
    assert DiskCorpus.open(path, tmp_path / "cache")[0].text == "y"  # stripped as in memory


def test_other_processes_wait_for_the_writers_side_files(big_file, tmp_path):
    with pytest.raises(DataError, match="did not appear .* within 0s"):
        DiskCorpus.open(big_file, tmp_path, writer=False, wait_s=0.0)
    assert not (tmp_path / side_folder(tmp_path, big_file).name).exists()  # a reader never writes
    DiskCorpus.open(big_file, tmp_path)
    assert len(DiskCorpus.open(big_file, tmp_path, writer=False, wait_s=0.0)) == 3_000


def test_opening_holds_the_side_files_not_the_passages(big_file, tmp_path):
    DiskCorpus.open(big_file, tmp_path)  # built; what is measured is a trainer opening it
    tracemalloc.start()
    try:
        disk = DiskCorpus.open(big_file, tmp_path)
        disk.position("p2500"), disk.take(np.arange(0, 3_000, 100))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < big_file.stat().st_size / 20, f"{peak} bytes traced for a {big_file.stat().st_size}-byte corpus"


def test_the_switch_and_the_loaders(big_file, tmp_path, monkeypatch):
    assert isinstance(CorpusOpener(False, tmp_path)(big_file), Corpus)
    assert isinstance(CorpusOpener(True, tmp_path)(big_file), DiskCorpus)
    assert isinstance(CorpusOpener("auto", tmp_path)(big_file), Corpus)  # under 100 MiB
    monkeypatch.setattr(dc, "AUTO_ON_DISK_BYTES", big_file.stat().st_size)
    assert isinstance(CorpusOpener("auto", tmp_path)(big_file), DiskCorpus)
    assert reads_from_disk(DataConfig(format="jsonl", path="q.jsonl", corpus_path=str(big_file)))
    assert not reads_from_disk(DataConfig())  # synthetic: no corpus file
    with pytest.raises(ValueError, match="side files"):
        CorpusOpener(True)(big_file)
    with pytest.raises(ValueError, match="corpus_on_disk: true reads data.corpus_path"):
        DataConfig(format="hotpotqa", path="h.json", corpus_on_disk=True)

    questions = write_jsonl(tmp_path / "q.jsonl", [
        {"id": "q1", "question": "?", "answers": ["a"], "gold_passage_ids": ["p10", "p2"]},
        {"id": "q2", "question": "?", "answers": ["b"], "gold_passage_ids": ["p4040"]}])
    cfg = DataConfig(format="jsonl", path=str(questions), corpus_path=str(big_file), corpus_on_disk=True)
    with raises_at(questions, "line 2", "gold_passage_ids", match="'p4040' is not in the corpus"):
        load_data(cfg, corpus_cache=tmp_path / "c")
    write_jsonl(questions, [{"id": "q1", "question": "?", "answers": ["a"], "gold_passage_ids": ["p10", "p2"]}])
    data = load_data(cfg, corpus_cache=tmp_path / "c")
    assert isinstance(data.corpus, DiskCorpus) and data.questions[0].gold_passage_ids == ("p10", "p2")

    hotpot = tmp_path / "h.json"  # HotPotQA over a user corpus: supporting-fact titles -> passages by title
    title = load_corpus_jsonl(big_file)[7].title
    hotpot.write_text(json.dumps([{"_id": "h0", "question": "?", "answer": "x", "supporting_facts": [[title, 0]],
                                   "context": []}]))
    hcfg = DataConfig(format="hotpotqa", path=str(hotpot), corpus_path=str(big_file), corpus_on_disk=True)
    assert load_data(hcfg, corpus_cache=tmp_path / "c").questions[0].gold_passage_ids == ("p7",)


def test_nothing_of_the_corpus_is_mapped_into_the_process(big_file, tmp_path):
    # read with pread: pages a memory map touched would count in the process' resident memory (RssFile)
    disk = DiskCorpus.open(big_file, tmp_path)
    assert [disk.position(f"p{i}") for i in (0, 1_234, 2_999)] == [0, 1_234, 2_999] and disk.take([5, 6])
    maps = open("/proc/self/maps").read() if os.path.exists("/proc/self/maps") else ""
    assert str(disk.folder) not in maps and str(big_file) not in maps
    disk.close()
