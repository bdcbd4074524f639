"""Run plan: every (variant x seed) of a sweep, each with a content-hash run id."""

from __future__ import annotations

import dataclasses
from typing import Any

from harness.architecture import ModelSummary, summarize_model
from harness.backends import BackendChoice, choose_backend, installed_backends, model_kind, require_installed
from harness.data import Dataset, split_sizes
from harness.errors import SpecError
from harness.health import diagnose_record
from harness.records import RunRecord, RunStatus
from harness.spec import SweepSpec, Variant, content_hash

# Bump when the meaning of a run changes (how data is split, how training is seeded...), so that
# stored results of the old protocol are never mistaken for the new one.
# 2: the Keras backend and its version joined the identity; steps_per_execution > 1 and larger
#    evaluation batches (same updates, evaluation sums in another order).
# 3: every vocabulary run trains as a group (`harness.fused`): data order is our own per-epoch
#    permutation drawn from (seed, epoch), a regularizer's penalty is part of the loss, the logged
#    loss averages per example; a run's math is the same alone or fused, so fusing is not in the id.
# 4: a sigmoid layer is a plain sigmoid on every backend (Keras' TensorFlow backend fed a sigmoid
#    output's logits to categorical cross-entropy, i.e. trained a softmax; `models.plain_sigmoid`).
# 5: a copy's logged loss is its per-example data loss plus its weight penalty at the epoch's end
#    (a metric cannot read weights in JAX's stateless steps: every regularized model FAILED on
#    JAX), and a weight that is not finite makes the run DIVERGED (TensorFlow's relu hid a NaN
#    weight from the loss). A builder's model that the harness compiles trains through the group
#    path like the vocabulary (own per-epoch order, fused or alone); one the user compiled trains
#    alone with Keras' shuffle, seeded.
TRAIN_PROTOCOL = 5


@dataclasses.dataclass(frozen=True)
class PlannedRun:
    run_id: str
    sweep: str
    variant: Variant
    seed: int
    deterministic: bool
    dataset: dict  # Dataset.describe(): name, fingerprint, sizes, subset
    summary: ModelSummary
    backend: BackendChoice = BackendChoice("tensorflow", "", "tensorflow")

    @property
    def budget(self) -> dict:
        budget = {
            "epochs": self.variant.epochs,
            "batch_size": self.variant.batch_size,
            "validation_split": self.variant.validation_split,
            "deterministic": self.deterministic,
            "keras_backend": self.backend.backend,
        }
        if self.backend.reason:
            budget["keras_backend_auto"] = self.backend.reason
        return budget

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
    def n_fit(self) -> int:
        """Training examples after the validation split (as planned, from the dataset's size)."""
        return split_sizes(int(self.dataset.get("n_train", 0)), self.variant.validation_split)[0]

    @property
    def estimated_train_flops(self) -> int:
        return self.summary.train_flops(examples=self.n_fit, epochs=self.variant.epochs)


def run_id_for(
    variant: Variant, *, seed: int, data_fingerprint: str, deterministic: bool, backend: BackendChoice
) -> str:
    """The run's identity is its content: variant content + seed + data + budget + the Keras
    backend and its version + protocol."""
    return content_hash(
        {
            "variant": variant.content(),
            "seed": seed,
            "data": data_fingerprint,
            "deterministic": deterministic,
            "keras_backend": [backend.backend, backend.version],
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


@dataclasses.dataclass(frozen=True)
class BackendContext:
    """What `auto` decides on: the device kind the sweep trains on, the installed backends and
    `harness calibrate`'s per-backend step timings for that device kind (None: not calibrated)."""

    device_kind: str = "cpu"
    installed: tuple[str, ...] | None = None  # None: look them up (importlib.metadata)
    calibration: dict | None = None


def resolve_backend(variant: Variant, context: BackendContext, *, file: str | None = None) -> BackendChoice:
    """The concrete backend of a variant's runs; `BackendNotInstalled` (a `UserError` naming the
    extra to install) when it asks for one that is missing."""
    installed = context.installed if context.installed is not None else installed_backends()
    backend, reason = choose_backend(
        variant.keras_backend,
        kind=model_kind(variant.model),
        device_kind=context.device_kind,
        installed=installed,
        calibration=context.calibration,
    )
    version = require_installed(backend, file=file)
    return BackendChoice(backend=backend, version=version, requested=variant.keras_backend, reason=reason)


def sweep_backends(spec: SweepSpec, context: BackendContext) -> dict[str, int]:
    """Runs per concrete Keras backend of a sweep (before its data is loaded): which workers to
    start. Raises `BackendNotInstalled` for a backend that is missing."""
    counts: dict[str, int] = {}
    for variant in spec.variants:
        backend = resolve_backend(variant, context, file=spec.source).backend
        counts[backend] = counts.get(backend, 0) + len(spec.seeds)
    return counts


def build_plan(
    spec: SweepSpec, dataset: Dataset, *, build_builders: bool = False, backends: BackendContext | None = None
) -> list[PlannedRun]:
    described = dataset.describe()
    context = backends or BackendContext()
    runs = []
    for variant in spec.variants:
        summary = summarize_variant(variant, dataset, source=spec.source, build_builders=build_builders)
        backend = resolve_backend(variant, context, file=spec.source)
        for seed in spec.seeds:
            runs.append(
                PlannedRun(
                    run_id=run_id_for(
                        variant,
                        seed=seed,
                        data_fingerprint=dataset.fingerprint,
                        deterministic=spec.deterministic,
                        backend=backend,
                    ),
                    sweep=spec.name,
                    variant=variant,
                    seed=seed,
                    deterministic=spec.deterministic,
                    dataset=described,
                    summary=summary,
                    backend=backend,
                )
            )
    return runs
