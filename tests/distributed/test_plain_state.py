"""What checkpoint state files may hold: tensors and plain data (checked before saving), the RNG state in that
form, and reading a state file from the bytes that match its checksum (never unpickling objects)."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from distrag.distributed.plain_state import check_plain, read_state, rng_state, set_rng_state, torch_bytes
from distrag.errors import CheckpointError


def test_plain_data_passes_and_anything_that_needs_pickle_is_named():
    check_plain({"t": torch.zeros(1), 3: [1.0, "a", None, True, (torch.float32, torch.Size([2]))]})
    with pytest.raises(TypeError, match=r"payload\['lr'\].*numpy"):
        check_plain({"lr": np.float64(0.1)})
    with pytest.raises(TypeError, match=r"payload\[0\].*Path"):
        check_plain([Path("x")])


def test_the_rng_state_round_trips_as_plain_data():
    state = rng_state()
    check_plain(state)
    draws = random.random(), float(np.random.rand()), torch.rand(2).tolist()
    set_rng_state(state)
    assert (random.random(), float(np.random.rand()), torch.rand(2).tolist()) == draws


class _Code:
    def __reduce__(self):
        return print, ("ran",)


def test_a_state_file_is_read_from_the_bytes_that_match_its_checksum(tmp_path):
    f = tmp_path / "state.pt"
    data = torch_bytes({"step": 1, "payload": {"w": torch.ones(2)}})
    f.write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    assert read_state(f, ("step", "payload"), digest)["step"] == 1
    with pytest.raises(CheckpointError, match="does not match its checksum"):
        read_state(f, ("step", "payload"), "0" * 64)
    with pytest.raises(CheckpointError, match=r"expected keys \['rng'\]"):
        read_state(f, ("rng",), digest)
    evil = torch_bytes({"step": 1, "payload": _Code()})
    f.write_bytes(evil)
    with pytest.raises(CheckpointError, match="could run code"):
        read_state(f, ("step", "payload"), hashlib.sha256(evil).hexdigest())
