"""The one record type that crosses module borders: a frozen `RunRecord` per (variant, seed)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import json
from typing import Any, Mapping

from harness.contracts import RunMetrics
from harness.health import Diagnosis

RECORD_VERSION = 1


def utcnow() -> str:
    """UTC timestamp used in records, to the millisecond."""
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")


class RunStatus(enum.Enum):
    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    DIVERGED = "diverged"

    def is_finished(self) -> bool:
        """A finished run is a result: it is not trained again on resume."""
        return self in (RunStatus.DONE, RunStatus.DIVERGED)

    def is_failure(self) -> bool:
        """Counted as a failure beside the mean (never silently dropped)."""
        return self in (RunStatus.FAILED, RunStatus.DIVERGED)


class RunFlag(enum.Enum):
    NEAR_CHANCE = "near_chance"  # finished, but test accuracy is close to 1/num_classes


@dataclasses.dataclass(frozen=True)
class RunRecord:
    """Everything known about one run: what was asked, what happened, and where."""

    run_id: str
    sweep: str
    variant: str
    variant_id: str
    seed: int
    status: RunStatus
    config: Mapping[str, Any]  # resolved model config of the variant
    budget: Mapping[str, Any]  # epochs, batch_size, validation_split, deterministic
    dataset: Mapping[str, Any]  # name, fingerprint, n_train, n_test, subset
    metrics: RunMetrics = dataclasses.field(default_factory=RunMetrics)  # a plain mapping is converted
    history: Mapping[str, list] = dataclasses.field(default_factory=dict)
    timings: Mapping[str, float] = dataclasses.field(default_factory=dict)
    device: str = ""
    versions: Mapping[str, str] = dataclasses.field(default_factory=dict)
    error: str | None = None
    flags: tuple[RunFlag, ...] = ()
    started_at: str | None = None
    finished_at: str | None = None
    record_version: int = RECORD_VERSION
    # health of a finished run (harness/health.py); None for failed runs and for records stored
    # before diagnoses existed (`health.health_of` diagnoses those on reading)
    diagnosis: Diagnosis | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.metrics, RunMetrics):
            object.__setattr__(self, "metrics", RunMetrics.from_dict(self.metrics))

    @property
    def test_accuracy(self) -> float | None:
        return self.metrics.test_accuracy

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        data["status"] = self.status.value
        data["metrics"] = self.metrics.to_dict()
        data["flags"] = [flag.value for flag in self.flags]
        data["diagnosis"] = self.diagnosis.to_dict() if self.diagnosis is not None else None
        return json.dumps(data, sort_keys=True, allow_nan=True)

    @classmethod
    def from_json(cls, text: str) -> "RunRecord":
        data = json.loads(text)
        version = data.get("record_version")
        if version != RECORD_VERSION:
            raise ValueError(f"run record version {version!r} is not supported (expected {RECORD_VERSION})")
        data["status"] = RunStatus(data["status"])
        data["flags"] = tuple(RunFlag(flag) for flag in data.get("flags", ()))
        diagnosis = data.get("diagnosis")
        data["diagnosis"] = Diagnosis.from_dict(diagnosis) if diagnosis else None
        return cls(**data)
