"""Health of a finished run: healthy, diverged, collapsed, or a train/eval mismatch, with the cause.

Pure functions of what a run record already holds (history, metrics, the model config, the
budget and the data sizes), so a diagnosis can be made for records stored before this module
existed. Nothing here imports TensorFlow.

The three failure shapes look alike in a leaderboard (a test accuracy near chance) and mean
opposite things:
- DIVERGED: the loss became NaN or infinite. Nothing was learnt after that point.
- COLLAPSED: training accuracy itself stayed at (or fell back to) chance. The optimisation failed.
- TRAIN_EVAL_MISMATCH: training accuracy (measured in training mode, batch by batch) is far above
  the evaluation accuracy (inference mode). The model learnt; what differs is inference. With batch
  normalisation the usual cause is moving statistics that have not caught up with the weights yet
  (momentum 0.99 keeps 0.99**steps of their starting values): more steps, or a lower
  `batchnorm_momentum`, fix it. Such a run says "too few steps for these statistics", not
  "this architecture is bad".
"""

from __future__ import annotations

import dataclasses
import enum
import math
from typing import TYPE_CHECKING, Any, Mapping, Sequence

if TYPE_CHECKING:
    from harness.records import RunRecord

NEAR_CHANCE_FACTOR = 1.5  # an accuracy under 1.5x chance is "near chance"
COLLAPSE_TRAIN_FACTOR = 2.0  # training accuracy under 2x chance: training itself did not learn
MISMATCH_MIN_TRAIN = 0.5  # a mismatch needs training accuracy at least halfway from chance to 100%...
MISMATCH_RATIO = 0.5  # ...and an evaluation accuracy at most half as far above chance as training
KERAS_BATCHNORM_MOMENTUM = 0.99  # Keras' default, used where a config does not say
BATCHNORM_RESIDUAL = 0.01  # moving statistics are "caught up" when their start weighs < 1%


class Health(enum.Enum):
    HEALTHY = "healthy"
    DIVERGED = "diverged"
    COLLAPSED = "collapsed"
    TRAIN_EVAL_MISMATCH = "train_eval_mismatch"

    @property
    def label(self) -> str:
        return _LABELS[self]

    def is_problem(self) -> bool:
        return self is not Health.HEALTHY


_LABELS = {
    Health.HEALTHY: "healthy",
    Health.DIVERGED: "diverged",
    Health.COLLAPSED: "collapsed",
    Health.TRAIN_EVAL_MISMATCH: "train/eval mismatch",
}


class Cause(enum.Enum):
    """Likely causes, named from what the model config holds (several may apply)."""

    BATCHNORM_STATISTICS = "batchnorm_statistics"
    DROPOUT_OR_REGULARIZATION = "dropout_or_regularization"
    OVERFITTING_OR_DATA_SHIFT = "overfitting_or_data_shift"
    LEARNING_RATE = "learning_rate"
    RAW_INPUTS = "raw_inputs"
    SIGMOID_OUTPUT = "sigmoid_output"
    UNKNOWN = "unknown"

    @property
    def label(self) -> str:
        return _CAUSE_LABELS[self]


_CAUSE_LABELS = {
    Cause.BATCHNORM_STATISTICS: "batch-norm moving statistics not converged",
    Cause.DROPOUT_OR_REGULARIZATION: "dropout / regularization acting differently in training and inference",
    Cause.OVERFITTING_OR_DATA_SHIFT: "overfitting a small training set, or train and test data that differ",
    Cause.LEARNING_RATE: "learning rate too high",
    Cause.RAW_INPUTS: "raw 0-255 inputs",
    Cause.SIGMOID_OUTPUT: "sigmoid output under a categorical loss",
    Cause.UNKNOWN: "unknown",
}


@dataclasses.dataclass(frozen=True)
class Diagnosis:
    """What is wrong with a run (if anything), the numbers that show it, and what to try."""

    health: Health
    causes: tuple[Cause, ...] = ()
    evidence: str = ""
    advice: str = ""
    train_accuracy: float | None = None  # final epoch, training mode (0-1)
    best_train_accuracy: float | None = None
    eval_accuracy: float | None = None  # test accuracy, inference mode (0-1)
    chance: float | None = None
    steps: int | None = None  # optimizer steps the run took

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["health"] = self.health.value
        data["causes"] = [cause.value for cause in self.causes]
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Diagnosis":
        known = {field.name for field in dataclasses.fields(cls)}
        values = {key: value for key, value in data.items() if key in known}
        values["health"] = Health(values["health"])
        values["causes"] = tuple(Cause(cause) for cause in values.get("causes", ()))
        return cls(**values)

    def summary(self) -> str:
        """One line: health, evidence, likely cause, what to do."""
        parts = [self.health.label]
        if self.evidence:
            parts.append(self.evidence)
        if self.causes:
            parts.append("likely cause: " + "; ".join(cause.label for cause in self.causes))
        if self.advice:
            parts.append("try: " + self.advice)
        return " — ".join(parts)


@dataclasses.dataclass(frozen=True)
class ModelTraits:
    """What a diagnosis needs to know of the model. None: unknown (a builder model)."""

    batchnorm: bool | None = False
    batchnorm_momentum: float = KERAS_BATCHNORM_MOMENTUM  # the highest one in the model
    dropout: bool | None = False
    regularizer: bool | None = False
    preprocess: str = "unit"
    output_activation: str | None = "softmax"
    loss: str = "categorical_crossentropy"
    optimizer: str = "adam"
    learning_rate: float | None = None


def model_traits(config: Mapping[str, Any]) -> ModelTraits:
    """Traits of a stored model config (`ModelConfig.model_dump()`, any age of record)."""
    optimizer = config.get("optimizer") or {}
    if isinstance(optimizer, str):
        optimizer = {"name": optimizer}
    common = {
        "preprocess": str(config.get("preprocess", "unit")),
        "loss": str(config.get("loss", "categorical_crossentropy")),
        "optimizer": str(optimizer.get("name", "adam")),
        "learning_rate": optimizer.get("learning_rate"),
    }
    if config.get("builder"):
        return ModelTraits(batchnorm=None, dropout=None, regularizer=None, output_activation=None, **common)
    blocks = list(config.get("conv") or [])
    dense = config.get("dense") or {}
    stacks = [b for b in blocks if b.get("batchnorm")] + ([dense] if dense.get("batchnorm") else [])
    momenta = [float(s.get("batchnorm_momentum", KERAS_BATCHNORM_MOMENTUM)) for s in stacks]
    rates = dense.get("dropout", 0.0)
    rates = rates if isinstance(rates, list) else [rates] * len(dense.get("units") or [])
    return ModelTraits(
        batchnorm=bool(stacks),
        batchnorm_momentum=max(momenta) if momenta else KERAS_BATCHNORM_MOMENTUM,
        dropout=any(float(b.get("dropout", 0.0)) > 0 for b in blocks) or any(float(r) > 0 for r in rates),
        regularizer=config.get("regularizer") is not None,
        output_activation=str(config.get("output_activation", "softmax")),
        **common,
    )


def _finite(values: Sequence[Any]) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def _norm(accuracy: float, chance: float) -> float:
    """Accuracy as a share of the way from chance (0) to perfect (1)."""
    return (accuracy - chance) / (1.0 - chance) if chance < 1.0 else 0.0


def _pct(value: float) -> str:
    return f"{100 * value:.1f}%"


def suggested_momentum(steps: int) -> float:
    """The highest two-decimal batch-norm momentum whose start weighs < 1% after `steps` steps."""
    if steps <= 0:
        return 0.0
    return math.floor(100 * BATCHNORM_RESIDUAL ** (1.0 / steps)) / 100


def diagnose(
    *,
    history: Mapping[str, Sequence[Any]],
    test_accuracy: float | None,
    test_loss: float | None,
    num_classes: int,
    traits: ModelTraits,
    steps: int | None = None,
    diverged: bool = False,
) -> Diagnosis:
    """The pure rule. `history` is the Keras fit history (loss, accuracy, val_*), accuracies 0-1."""
    chance = 1.0 / num_classes if num_classes > 0 else 0.1
    train = _finite(history.get("accuracy") or [])
    losses = list(history.get("loss") or [])
    final_train = train[-1] if train else None
    best_train = max(train) if train else None
    common = {
        "train_accuracy": final_train,
        "best_train_accuracy": best_train,
        "eval_accuracy": test_accuracy,
        "chance": chance,
        "steps": steps,
    }

    bad_epoch = next((i for i, v in enumerate(losses) if v is None or not math.isfinite(float(v))), None)
    loss_bad = test_loss is not None and not math.isfinite(float(test_loss))
    if diverged or bad_epoch is not None or loss_bad:
        where = f"in epoch {bad_epoch + 1}" if bad_epoch is not None else "by the end of training"
        causes = _optimisation_causes(traits)
        return Diagnosis(
            Health.DIVERGED,
            causes=causes,
            evidence=f"the loss became NaN or infinite {where}",
            advice="a lower learning rate, inputs scaled to [0, 1] (preprocess: unit), or batch normalization",
            **common,
        )
    if test_accuracy is None or not math.isfinite(test_accuracy):
        return Diagnosis(Health.HEALTHY, **common)

    eval_near_chance = test_accuracy < NEAR_CHANCE_FACTOR * chance
    if final_train is None:
        if not eval_near_chance:
            return Diagnosis(Health.HEALTHY, **common)
        return Diagnosis(
            Health.COLLAPSED,
            causes=(Cause.UNKNOWN,),
            evidence=f"test accuracy {_pct(test_accuracy)} is near chance ({_pct(chance)}); no training accuracy "
            "was recorded to tell a collapse from a train/eval mismatch",
            **common,
        )

    train_norm, eval_norm = _norm(final_train, chance), _norm(test_accuracy, chance)
    mismatch = (final_train >= COLLAPSE_TRAIN_FACTOR * chance and eval_near_chance) or (
        train_norm >= MISMATCH_MIN_TRAIN and eval_norm <= MISMATCH_RATIO * train_norm
    )
    if mismatch:
        return _mismatch(final_train, test_accuracy, chance, eval_near_chance, traits, steps, common)
    if eval_near_chance or final_train < NEAR_CHANCE_FACTOR * chance:
        fell = (
            f"; it had reached {_pct(best_train)} before falling back"
            if best_train is not None and best_train >= COLLAPSE_TRAIN_FACTOR * chance
            else ""
        )
        return Diagnosis(
            Health.COLLAPSED,
            causes=_optimisation_causes(traits),
            evidence=f"training accuracy {_pct(final_train)} and test accuracy {_pct(test_accuracy)} are both "
            f"near chance ({_pct(chance)}){fell}: the optimisation itself failed",
            advice="a lower learning rate, inputs scaled to [0, 1] (preprocess: unit), a softmax output, "
            "other seeds (a collapse can depend on the initialisation)",
            **common,
        )
    return Diagnosis(Health.HEALTHY, **common)


def _optimisation_causes(traits: ModelTraits) -> tuple[Cause, ...]:
    causes = []
    lr = traits.learning_rate
    if lr is not None and lr >= (1.0 if traits.optimizer == "sgd" else 0.05):
        causes.append(Cause.LEARNING_RATE)
    if traits.preprocess == "none":
        causes.append(Cause.RAW_INPUTS)
    if traits.output_activation == "sigmoid" and traits.loss in ("categorical_crossentropy", "sparse_categorical_crossentropy"):
        causes.append(Cause.SIGMOID_OUTPUT)
    return tuple(causes) or (Cause.UNKNOWN,)


def _mismatch(
    train: float, test: float, chance: float, at_chance: bool, traits: ModelTraits, steps: int | None, common: dict
) -> Diagnosis:
    where = f"at chance ({_pct(chance)})" if at_chance else f"far below it (chance {_pct(chance)})"
    evidence = f"training accuracy {_pct(train)} but test accuracy {_pct(test)}, {where}: the model learnt, " \
        "inference differs — not a collapse"
    causes: list[Cause] = []
    advice: list[str] = []
    if traits.batchnorm is None:  # a builder model: its layers are not known here
        causes.append(Cause.BATCHNORM_STATISTICS)
        advice.append("if the model has batch normalization: more steps, or a lower batch-norm momentum")
    elif traits.batchnorm:
        causes.append(Cause.BATCHNORM_STATISTICS)
        m = traits.batchnorm_momentum
        if steps:
            residual = m**steps
            evidence += f"; {steps} steps at batch-norm momentum {m:g} leave {100 * residual:.0f}% of the moving statistics' start"
            needed = math.ceil(math.log(BATCHNORM_RESIDUAL) / math.log(m)) if 0 < m < 1 else None
            more = f"at least {needed} steps" if needed and needed > steps else "more steps"
            lower = suggested_momentum(steps)
            advice.append(f"train {more} (more data or epochs, or a smaller batch)")
            if 0 < lower < m:
                advice.append(f"or a lower batchnorm_momentum (<= {lower:g} at this budget)")
        else:
            advice.append("more steps, or a lower batchnorm_momentum")
    if traits.dropout or traits.regularizer or traits.dropout is None:
        causes.append(Cause.DROPOUT_OR_REGULARIZATION)
    if traits.batchnorm is False:
        causes.append(Cause.OVERFITTING_OR_DATA_SHIFT)
        advice.append("more training data or regularization; check that train and test come from the same distribution")
    return Diagnosis(Health.TRAIN_EVAL_MISMATCH, causes=tuple(causes), evidence=evidence, advice=" ".join(advice), **common)


def record_steps(record: "RunRecord") -> int | None:
    """Optimizer steps a run took: epochs run x batches per epoch (from its budget and data sizes)."""
    n_train = record.dataset.get("n_train")
    batch = record.budget.get("batch_size")
    epochs = record.metrics.get("epochs_ran", record.budget.get("epochs"))
    if not n_train or not batch or epochs is None:
        return None
    from harness.data import split_sizes

    n_fit, _n_val = split_sizes(int(n_train), float(record.budget.get("validation_split") or 0.0))
    return int(epochs) * math.ceil(n_fit / int(batch))


def diagnose_record(record: "RunRecord") -> Diagnosis | None:
    """The diagnosis of a finished record (None for a FAILED or unfinished one)."""
    if not record.status.is_finished():
        return None
    return diagnose(
        history=record.history,
        test_accuracy=record.test_accuracy,
        test_loss=record.metrics.get("test_loss"),
        num_classes=int(record.dataset.get("num_classes") or 10),
        traits=model_traits(record.config),
        steps=record_steps(record),
        diverged=record.status.value == "diverged",
    )


def health_of(record: "RunRecord") -> Diagnosis | None:
    """The stored diagnosis, or one made now for a record stored before diagnoses existed."""
    return record.diagnosis if record.diagnosis is not None else diagnose_record(record)
