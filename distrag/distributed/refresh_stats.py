"""What the asynchronous index refresh cost a trainer: time blocked on the protocol, and index staleness.

:class:`RefreshStats` is kept by each trainer's :class:`~distrag.distributed.refresh_client.IndexClient`:

* **blocked time**: seconds the training loop spent inside the protocol's calls instead of training:
  the per-step poll (trainer 0's look at the store and the decision's broadcast, which the other trainers
  wait for), the swap to an adopted version (``load_fn``), and trainer 0's weights hand-off (the CPU copy,
  and waiting for the previous background write). Nested calls (``wait_for_version`` polling) count once.
* **staleness**: at every step, how many optimizer steps the index in use lags behind the encoder that
  trains (``step - weights_step`` of the adopted version; before the first version the frozen index of
  the base encoder, weights step 0), as a mean and a maximum over steps, and the number of versions
  adopted.

The runner (:mod:`distrag.distributed.runner`) gathers every trainer's :meth:`RefreshStats.summary`
and logs ``index/blocked_s`` and ``index/blocked_share`` (per trainer and their mean),
``index/staleness_mean``, ``index/staleness_max`` and ``index/versions_adopted``, with
``index/versions_published`` from the run folder (metric names in :mod:`distrag.metric_names`), in the
run's one MLflow run.
Staleness and adoptions are the same on every trainer (adoption is agreed) and survive a resume
(:meth:`state_dict`); blocked time is this process's, from its start.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager


class RefreshStats:
    """One trainer's refresh costs; :meth:`blocking` and :meth:`note_step` fill it in."""

    def __init__(self, *, blocked_s: float = 0.0, n_adopted: int = 0):
        self.blocked_s = blocked_s
        """Seconds blocked on the protocol in this process."""
        self.n_adopted = n_adopted
        """Index versions adopted (trainer 0 was charged one corpus pass for each)."""
        self.steps, self.staleness_sum, self.staleness_max = 0, 0.0, 0
        """Steps whose staleness was recorded, the sum of the index's lag over them, the largest lag."""
        self._depth, self._t0 = 0, 0.0  # protocol calls open (nested ones count once), when the outermost began
        self._last_step: int | None = None  # the step noted last (a second poll at that step is not a step)

    @contextmanager
    def blocking(self) -> Iterator[None]:
        """Time a protocol call as blocked (an inner call inside an outer one is not counted again)."""
        if self._depth == 0:
            self._t0 = time.perf_counter()
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            if self._depth == 0:
                self.blocked_s += time.perf_counter() - self._t0

    def note_step(self, step: int, weights_step: int | None) -> None:
        """The index used at ``step`` was built from the weights of ``weights_step`` (None: the base encoder's)."""
        if step == self._last_step:  # polled again at the same step (waiting for a version)
            return
        self._last_step = int(step)
        lag = max(0, int(step) - int(weights_step or 0))
        self.steps += 1
        self.staleness_sum += lag
        self.staleness_max = max(self.staleness_max, lag)

    @property
    def staleness_mean(self) -> float:
        return self.staleness_sum / self.steps if self.steps else 0.0

    def summary(self, train_s: float) -> dict[str, float]:
        """Totals for the run, with the blocked share of ``train_s`` (this trainer's training wall-clock)."""
        return {"blocked_s": self.blocked_s, "blocked_share": self.blocked_s / train_s if train_s > 0 else 0.0,
                "staleness_mean": self.staleness_mean, "staleness_max": float(self.staleness_max),
                "n_adopted": float(self.n_adopted)}

    def state_dict(self) -> dict:
        """What a checkpoint carries: staleness and adoptions (agreed on every trainer)."""
        return {"steps": self.steps, "staleness_sum": self.staleness_sum, "staleness_max": self.staleness_max,
                "n_adopted": self.n_adopted}

    def load_state_dict(self, state: dict) -> None:
        self.steps = int(state.get("steps", 0))
        self.staleness_sum = float(state.get("staleness_sum", 0.0))
        self.staleness_max = int(state.get("staleness_max", 0))
        self.n_adopted = int(state.get("n_adopted", 0))
