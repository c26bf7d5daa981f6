"""The refresh protocol's records: signed, bound to their store key, and refused when anything else arrives."""

from __future__ import annotations

from distrag.distributed.refresh_protocol import read_record, signed_record


def test_signed_records_round_trip_and_anything_else_is_refused():
    key = b"k" * 32
    raw = signed_record(key, "meta/1", {"version": 2, "path": "/run/index/v000002"}).encode()
    assert read_record(key, "meta/1", raw) == ({"version": 2, "path": "/run/index/v000002"}, "")
    assert read_record(b"x" * 32, "meta/1", raw)[0] is None
    assert read_record(key, "meta/1", b'{"version": 2}') == (None, "not a signed record")
    assert read_record(key, "meta/1", b"\xff") == (None, "not a signed record")
    tampered = raw.replace(b"v000002", b"v000003")
    assert read_record(key, "meta/1", tampered)[1] == "its signature does not verify under the run's secret"
