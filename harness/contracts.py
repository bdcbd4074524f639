"""Typed contracts that cross the store: what a sweep is (`SweepInfo`, one `VariantInfo` per
variant, its `DatasetInfo`) and what a run measured (`RunMetrics`).

Each is a small frozen dataclass with `to_json`/`from_json` (and `to_dict`/`from_dict`), like
`RunRecord`. Readers are lenient on purpose: a key an older harness did not write gets its default
and a key a newer one added is kept aside (`extra`), so stores written by earlier versions still
report.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Iterator, Mapping


def _known(cls: type) -> set[str]:
    return {field.name for field in dataclasses.fields(cls)}


def _opt_int(value: Any) -> int | None:
    return None if value is None else int(value)


def _opt_float(value: Any) -> float | None:
    return None if value is None else float(value)


# --------------------------------------------------------------------------- the sweep


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """The data a sweep trained on, as `Dataset.describe()` gives it."""

    name: str = ""
    source: str = ""
    fingerprint: str | None = None
    n_train: int | None = None
    n_test: int | None = None
    image_shape: tuple[int, ...] = ()
    num_classes: int | None = None
    subset: Mapping[str, Any] | None = None
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = {field.name: getattr(self, field.name) for field in dataclasses.fields(self) if field.name != "extra"}
        data["image_shape"] = list(self.image_shape)
        data["subset"] = dict(self.subset) if self.subset is not None else None
        return {**dict(self.extra), **data}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> "DatasetInfo":
        data = dict(data or {})
        known = _known(cls) - {"extra"}
        return cls(
            name=str(data.get("name") or ""),
            source=str(data.get("source") or ""),
            fingerprint=data.get("fingerprint"),
            n_train=_opt_int(data.get("n_train")),
            n_test=_opt_int(data.get("n_test")),
            image_shape=tuple(int(x) for x in data.get("image_shape") or ()),
            num_classes=_opt_int(data.get("num_classes")),
            subset=dict(data["subset"]) if data.get("subset") else None,
            extra={k: v for k, v in data.items() if k not in known},
        )


@dataclasses.dataclass(frozen=True)
class VariantInfo:
    """One variant of a sweep: its name and id, where it sits in the grid, its published numbers,
    its size and budget."""

    name: str
    variant_id: str = ""
    base: str = ""
    grid_point: tuple[tuple[str, Any], ...] = ()
    reference: tuple[float, ...] = ()
    params: int = 0
    epochs: int | None = None
    batch_size: int | None = None
    validation_split: float | None = None
    estimated_train_flops: float = 0.0
    keras_backend: str = ""
    keras_backend_requested: str = ""
    tuner: Mapping[str, Any] | None = None  # the KerasTuner trial a tuned variant came from (`harness tune`)
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def grid(self) -> dict[str, Any]:
        return dict(self.grid_point)

    def to_dict(self) -> dict[str, Any]:
        data = {field.name: getattr(self, field.name) for field in dataclasses.fields(self) if field.name != "extra"}
        data["grid_point"] = [[k, v] for k, v in self.grid_point]
        data["reference"] = list(self.reference)
        if self.tuner is None:
            del data["tuner"]
        else:
            data["tuner"] = dict(self.tuner)
        return {**dict(self.extra), **data}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "VariantInfo":
        known = _known(cls) - {"extra"}
        return cls(
            name=str(data["name"]),
            variant_id=str(data.get("variant_id") or ""),
            base=str(data.get("base") or ""),
            grid_point=tuple((str(k), v) for k, v in data.get("grid_point") or ()),
            reference=tuple(float(r) for r in data.get("reference") or ()),
            params=int(data.get("params") or 0),
            epochs=_opt_int(data.get("epochs")),
            batch_size=_opt_int(data.get("batch_size")),
            validation_split=_opt_float(data.get("validation_split")),
            estimated_train_flops=float(data.get("estimated_train_flops") or 0.0),
            keras_backend=str(data.get("keras_backend") or ""),
            keras_backend_requested=str(data.get("keras_backend_requested") or ""),
            tuner=dict(data["tuner"]) if data.get("tuner") else None,
            extra={k: v for k, v in data.items() if k not in known},
        )


@dataclasses.dataclass(frozen=True)
class AdaptiveSeeds:
    """`budget.seeds: {min, max, ci_half_width}` or `--seeds auto`: every variant starts with `min`
    seeds; a variant whose interval of the mean (the table's Student-t interval, `confidence`) is
    still wider than +-`ci_half_width` accuracy points gets more, up to `max`."""

    min: int = 3
    max: int = 10
    ci_half_width: float = 0.5
    confidence: float = 0.95

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> "AdaptiveSeeds | None":
        if not data:
            return None
        return cls(int(data["min"]), int(data["max"]), float(data["ci_half_width"]), float(data.get("confidence", 0.95)))

    def describe(self) -> str:
        return (
            f"adaptive seeds: {self.min} to {self.max} per variant, more while the "
            f"{self.confidence:.0%} interval of the mean is wider than +-{self.ci_half_width:g} points"
        )


@dataclasses.dataclass(frozen=True)
class SweepInfo:
    """What the report needs about a sweep besides its runs. `source` and `planned_at` are filled
    in by the store when it reads the plan back."""

    name: str
    description: str = ""
    seeds: tuple[int, ...] = ()
    deterministic: bool = False
    dataset: DatasetInfo = dataclasses.field(default_factory=DatasetInfo)
    variants: tuple[VariantInfo, ...] = ()
    source: str | None = None
    planned_at: str | None = None
    adaptive: AdaptiveSeeds | None = None
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def variant(self, name: str) -> VariantInfo | None:
        return next((v for v in self.variants if v.name == name), None)

    @property
    def variant_names(self) -> list[str]:
        return [v.name for v in self.variants]

    def grid_axes(self) -> list[str]:
        """The sweep's grid keys, in file order."""
        axes: list[str] = []
        for variant in self.variants:
            for key, _value in variant.grid_point:
                if key not in axes:
                    axes.append(key)
        return axes

    def merged_with(self, newer: "SweepInfo") -> "SweepInfo":
        """`newer` (a run of some variants, `--only`) over this plan: its variants replace the ones
        of the same name, the others are kept in their order."""
        mine = {v.name: v for v in newer.variants}
        kept = [mine.pop(v.name, v) for v in self.variants]
        return dataclasses.replace(newer, variants=tuple(kept + list(mine.values())))

    def to_dict(self) -> dict[str, Any]:
        data = {
            "name": self.name,
            "description": self.description,
            "seeds": list(self.seeds),
            "deterministic": self.deterministic,
            "dataset": self.dataset.to_dict(),
            "variants": [v.to_dict() for v in self.variants],
        }
        if self.source is not None:
            data["source"] = self.source
        if self.planned_at is not None:
            data["planned_at"] = self.planned_at
        if self.adaptive is not None:
            data["adaptive"] = self.adaptive.to_dict()
        return {**dict(self.extra), **data}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, allow_nan=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "SweepInfo":
        known = _known(cls) - {"extra"}
        return cls(
            name=str(data.get("name") or ""),
            description=str(data.get("description") or ""),
            seeds=tuple(int(s) for s in data.get("seeds") or ()),
            deterministic=bool(data.get("deterministic", False)),
            dataset=DatasetInfo.from_dict(data.get("dataset")),
            variants=tuple(VariantInfo.from_dict(v) for v in data.get("variants") or ()),
            source=data.get("source"),
            planned_at=data.get("planned_at"),
            adaptive=AdaptiveSeeds.from_dict(data.get("adaptive")),
            extra={k: v for k, v in data.items() if k not in known},
        )

    @classmethod
    def from_json(cls, text: str) -> "SweepInfo":
        return cls.from_dict(json.loads(text))

    @classmethod
    def coerce(cls, info: "SweepInfo | Mapping[str, Any]") -> "SweepInfo":
        return info if isinstance(info, SweepInfo) else cls.from_dict(info)


def sweep_info(prepared: Any) -> SweepInfo:
    """The `SweepInfo` of a prepared sweep (`harness.sweep.PreparedSweep`): one `VariantInfo` per
    variant, in plan order."""
    spec = prepared.spec
    variants: dict[str, VariantInfo] = {}
    for run in prepared.runs:
        if run.variant.name in variants:
            continue
        variants[run.variant.name] = VariantInfo(
            name=run.variant.name,
            variant_id=run.variant.variant_id,
            base=run.variant.base or "",
            grid_point=tuple((k, v) for k, v in run.variant.grid_point),
            reference=tuple(float(r) for r in run.variant.reference),
            params=int(run.summary.params or 0),
            epochs=run.variant.epochs,
            batch_size=run.variant.batch_size,
            validation_split=run.variant.validation_split,
            estimated_train_flops=float(run.estimated_train_flops or 0),
            keras_backend=run.backend.backend,
            keras_backend_requested=run.backend.requested,
            tuner=run.variant.tuner.model_dump() if getattr(run.variant, "tuner", None) is not None else None,
        )
    return SweepInfo(
        name=spec.name,
        description=spec.description or "",
        seeds=tuple(spec.seeds),
        deterministic=bool(spec.deterministic),
        dataset=DatasetInfo.from_dict(prepared.dataset.describe()),
        variants=tuple(variants.values()),
        adaptive=getattr(spec, "adaptive", None),
    )


# --------------------------------------------------------------------------- a run's metrics


@dataclasses.dataclass(frozen=True, eq=False)
class RunMetrics(Mapping[str, Any]):
    """What a finished run measured. Typed fields for what harness itself writes, `extra` for the
    rest; it still reads as a mapping (`metrics.get("test_accuracy")`) for older callers."""

    test_accuracy: float | None = None
    test_loss: float | None = None
    params: int | None = None
    epochs_ran: int | None = None
    estimated_train_flops: float | None = None
    train_flops_per_s: float | None = None
    examples_per_s: float | None = None
    steps_per_execution: int | None = None
    final_accuracy: float | None = None
    final_val_accuracy: float | None = None
    final_loss: float | None = None
    final_val_loss: float | None = None
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = dict(self.extra)
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name != "extra" and value is not None:
                data[field.name] = value
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, allow_nan=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> "RunMetrics":
        if isinstance(data, RunMetrics):
            return data
        data = dict(data or {})
        kwargs: dict[str, Any] = {}
        ints = {"params", "epochs_ran", "steps_per_execution"}
        for name in _known(cls) - {"extra"}:
            value = data.pop(name, None)
            if value is None:
                continue
            try:
                kwargs[name] = int(value) if name in ints else float(value)
            except (TypeError, ValueError):
                data[name] = value  # not a number: kept as written, never lost
        return cls(**kwargs, extra=data)

    @classmethod
    def from_json(cls, text: str) -> "RunMetrics":
        return cls.from_dict(json.loads(text))

    # read-only mapping view, so `record.metrics.get(key)` and `record.metrics[key]` keep working
    def __getitem__(self, key: str) -> Any:
        return self.to_dict()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.to_dict())

    def __len__(self) -> int:
        return len(self.to_dict())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Mapping):
            return self.to_dict() == dict(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

