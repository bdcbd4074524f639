"""Run plan: every (variant x seed) of a sweep, each with a content-hash run id."""

from __future__ import annotations

import dataclasses
from typing import Any

from harness.architecture import ModelSummary, summarize_model
from harness.data import Dataset
from harness.errors import SpecError
from harness.health import diagnose_record
from harness.records import RunRecord, RunStatus
from harness.spec import SweepSpec, Variant, content_hash

# Bump when the meaning of a run changes (how data is split, how training is seeded...), so that
# stored results of the old protocol are never mistaken for the new one.
TRAIN_PROTOCOL = 1


@dataclasses.dataclass(frozen=True)
class PlannedRun:
    run_id: str
    sweep: str
    variant: Variant
    seed: int
    deterministic: bool
    dataset: dict  # Dataset.describe(): name, fingerprint, sizes, subset
    summary: ModelSummary

    @property
    def budget(self) -> dict:
        return {
            "epochs": self.variant.epochs,
            "batch_size": self.variant.batch_size,
            "validation_split": self.variant.validation_split,
            "deterministic": self.deterministic,
        }

    def record(self, status: RunStatus, **fields: Any) -> RunRecord:
        """A `RunRecord` of this run: identity, config, budget and data filled in from the plan;
        a finished run also gets its health diagnosis (`harness.health`)."""
        record = RunRecord(
            run_id=self.run_id,
            sweep=self.sweep,
            variant=self.variant.name,
            variant_id=self.variant.variant_id,
            seed=self.seed,
            status=status,
            config=self.variant.model.model_dump(mode="json"),
            budget=self.budget,
            dataset=self.dataset,
            **fields,
        )
        if "diagnosis" not in fields and status.is_finished():
            record = dataclasses.replace(record, diagnosis=diagnose_record(record))
        return record

    @property
    def estimated_train_flops(self) -> int:
        n_fit = int(self.dataset["n_train"] * (1.0 - self.variant.validation_split))
        return self.summary.train_flops(examples=n_fit, epochs=self.variant.epochs)


def run_id_for(variant: Variant, *, seed: int, data_fingerprint: str, deterministic: bool) -> str:
    """The run's identity is its content: variant content + seed + data + budget + protocol."""
    return content_hash(
        {
            "variant": variant.content(),
            "seed": seed,
            "data": data_fingerprint,
            "deterministic": deterministic,
            "protocol": TRAIN_PROTOCOL,
        }
    )[:20]


def summarize_variant(variant: Variant, dataset: Dataset, *, source: str, build_builders: bool = False) -> ModelSummary:
    """Parameters and FLOPs of a variant's model: the shape walk for the vocabulary; for a builder
    model, nothing (params 0: unknown, FLOPs 0) unless `build_builders` builds it (imports
    TensorFlow and the user's module: dry runs only)."""
    if variant.model.builder is not None:
        from harness.builders import builder_summary

        return builder_summary(variant, dataset, source=source, build=build_builders)
    try:
        return summarize_model(variant.model, input_shape=dataset.image_shape, num_classes=dataset.num_classes)
    except ValueError as exc:
        raise SpecError(f"{exc} (variant '{variant.name}', images {dataset.image_shape})", file=source, key="conv") from None


def build_plan(spec: SweepSpec, dataset: Dataset, *, build_builders: bool = False) -> list[PlannedRun]:
    described = dataset.describe()
    runs = []
    for variant in spec.variants:
        summary = summarize_variant(variant, dataset, source=spec.source, build_builders=build_builders)
        for seed in spec.seeds:
            runs.append(
                PlannedRun(
                    run_id=run_id_for(
                        variant, seed=seed, data_fingerprint=dataset.fingerprint, deterministic=spec.deterministic
                    ),
                    sweep=spec.name,
                    variant=variant,
                    seed=seed,
                    deterministic=spec.deterministic,
                    dataset=described,
                    summary=summary,
                )
            )
    return runs
