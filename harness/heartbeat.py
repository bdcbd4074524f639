"""Training progress from inside a worker: the fraction of a work group's epochs done.

A worker sets a sink around the training of a group (`reporting`); the trainers call `report`
with the fraction of their own work done, after each epoch and, where Keras trains several
steps between epochs' ends, after each of its calls of the train function
(`train.progress_callbacks`). A trainer that trains the runs of a group one after another gives
each its share of the group (`part`), so the fraction the sink receives is always the group's. Without a sink (a test, a notebook) `report` does nothing.

The driver turns these fractions into `executor.GroupProgress` events and the ETA extrapolates
a running group from them (`eta.extrapolate`), so a sweep whose first group trains for an hour
has an estimate within seconds (its first calls of the train function) instead of after that hour.

Pure: no Keras, no clocks; one sink per process (a worker trains one group at a time). Keras
may run the callbacks that report in a helper thread: a sink must be thread-safe
(`executor.ProgressSink` is).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

Sink = Callable[[float], None]

_sink: Sink | None = None
_span: tuple[float, float] = (0.0, 1.0)  # the part of the group the current trainer's [0, 1] maps to


@contextlib.contextmanager
def reporting(sink: Sink) -> Iterator[None]:
    """Send the fractions reported while this block runs (one group's training) to `sink`."""
    global _sink, _span
    before = _sink, _span
    _sink, _span = sink, (0.0, 1.0)
    try:
        yield
    finally:
        _sink, _span = before


@contextlib.contextmanager
def part(index: int, count: int) -> Iterator[None]:
    """The block trains the `index`-th of `count` equal parts of the current work: its fractions
    0..1 are reported as that part of the whole."""
    global _span
    before = _span
    low, high = before
    width = (high - low) / max(1, count)
    _span = (low + width * index, low + width * (index + 1))
    try:
        yield
    finally:
        _span = before


def listening() -> bool:
    """Whether a sink takes the reports (a trainer need not make them otherwise)."""
    return _sink is not None


def report(fraction: float) -> None:
    """This trainer's work is `fraction` done (0..1; clamped). Never raises: progress is advice,
    and a sink that fails (its pipe closed) must not fail the run."""
    if _sink is None:
        return
    low, high = _span
    done = low + (high - low) * min(1.0, max(0.0, float(fraction)))
    try:
        _sink(done)
    except Exception:  # noqa: BLE001 - see above
        pass
