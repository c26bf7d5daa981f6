"""gather_with_grad on two gloo trainers: the rows of every trainer in trainer order, and a backward that hands
each trainer the summed gradient of the rows it contributed."""

from __future__ import annotations

import numpy as np
import pytest
from _dist_workers import Job

pytestmark = pytest.mark.timeout(180)


def test_gather_with_grad_concatenates_and_returns_each_trainer_its_rows_gradient(tmp_path, clean_env):
    job = Job("gather", {"out": str(tmp_path)}, 2, tmp_path)
    assert job.wait(150) == [0, 0], job.output()
    res = [job.result(r) for r in range(2)]
    # trainer r contributed r + 2 rows of 3: 0..5 on trainer 0, 100..108 on trainer 1
    rows = [np.arange(3 * (r + 2)).reshape(r + 2, 3) + 100 * r for r in range(2)]
    whole = np.concatenate(rows)
    for r in range(2):
        np.testing.assert_array_equal(res[r]["out"], whole)
    assert [x["offset"] for x in res] == [0, 2]
    # trainer r's loss is sum(out * arange * (r + 1)): the gradient of the sum of both losses on the whole result
    # is arange * 3, and each trainer gets its own rows of it
    summed = np.arange(whole.size).reshape(whole.shape) * 3.0
    np.testing.assert_array_equal(res[0]["grad"], summed[:2])
    np.testing.assert_array_equal(res[1]["grad"], summed[2:])
