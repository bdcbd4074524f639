"""Sweep files: safe YAML -> validated `SweepSpec` -> variants (with grid expansion).

Nothing here imports TensorFlow: validating a sweep and planning it stay fast.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import fnmatch
import hashlib
import itertools
import json
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping, Sequence

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from harness.contracts import AdaptiveSeeds
from harness.errors import SpecError

SCHEMA_VERSION = 1
BUILTIN_DATASETS = ("mnist", "fashion_mnist", "cifar10", "cifar100")

Activation = Literal["relu", "tanh", "sigmoid", "elu", "selu", "gelu", "swish", "linear"]
DropoutRate = Annotated[float, Field(ge=0.0, lt=1.0)]
PositiveInt = Annotated[int, Field(gt=0)]
KerasBackend = Literal["tensorflow", "jax", "torch", "auto"]  # harness.backends.BACKEND_CHOICES


class _Strict(BaseModel):
    # inf/NaN are never a learning rate, a factor or a split: refused at validation, not trained.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


# Bounds on what a sweep file may ask for, checked before anything is expanded, trained or written.
# Each can be raised through its environment variable when a sweep really needs more.
MAX_SEED = 2**32 - 1  # Keras' set_random_seed accepts 0 .. 2**32 - 1
LIMITS = {
    "file_bytes": ("HARNESS_MAX_SWEEP_BYTES", 1_000_000),
    "yaml_nodes": ("HARNESS_MAX_YAML_NODES", 200_000),
    "variants": ("HARNESS_MAX_VARIANTS", 10_000),
    "seeds": ("HARNESS_MAX_SEEDS", 10_000),
}


def limit(name: str) -> int:
    env, default = LIMITS[name]
    text = os.environ.get(env, "")
    return int(text) if text.isdigit() and int(text) > 0 else default


def _over_limit(name: str, what: str) -> str:
    env, _default = LIMITS[name]
    return f"{what} is over the limit of {limit(name):,} (raise it with {env}=N)"


def _as_list(value: Any) -> Any:
    return [value] if isinstance(value, (int, float)) and not isinstance(value, bool) else value


# Keras' BatchNormalization defaults. The moving statistics used at inference are updated as
# moving = momentum * moving + (1 - momentum) * batch, so after k steps their starting values still
# weigh momentum**k: 0.99 needs ~460 steps to forget them (harness/health.py explains the symptom).
BATCHNORM_MOMENTUM = 0.99
BATCHNORM_EPSILON = 0.001
BatchnormMomentum = Annotated[float, Field(ge=0.0, lt=1.0)]
BatchnormEpsilon = Annotated[float, Field(gt=0.0, le=1.0)]


class ConvBlock(_Strict):
    """Conv layers with a shared setting, then optional pooling and dropout."""

    filters: list[PositiveInt] = Field(min_length=1)
    kernel_size: PositiveInt = 3
    activation: Activation = "relu"
    padding: Literal["valid", "same"] = "valid"
    batchnorm: bool = False
    batchnorm_momentum: BatchnormMomentum = BATCHNORM_MOMENTUM  # of each conv layer's batch norm
    batchnorm_epsilon: BatchnormEpsilon = BATCHNORM_EPSILON
    pool: Literal["max", "avg", "none"] = "max"
    pool_size: PositiveInt = 2
    dropout: DropoutRate = 0.0

    _filters_list = field_validator("filters", mode="before")(_as_list)


class DenseStack(_Strict):
    """Hidden dense layers; each is Dense -> [BatchNorm] -> activation -> [Dropout]."""

    units: list[PositiveInt] = Field(default_factory=list)
    activation: Activation = "relu"
    dropout: DropoutRate | list[DropoutRate] = 0.0  # one rate for all, or one per layer
    batchnorm: bool = False
    batchnorm_momentum: BatchnormMomentum = BATCHNORM_MOMENTUM
    batchnorm_epsilon: BatchnormEpsilon = BATCHNORM_EPSILON

    _units_list = field_validator("units", mode="before")(_as_list)

    @model_validator(mode="after")
    def _dropout_per_layer(self) -> "DenseStack":
        if isinstance(self.dropout, list) and len(self.dropout) != len(self.units):
            raise ValueError(
                f"dropout lists one rate per dense layer: {len(self.dropout)} rates for {len(self.units)} layers"
            )
        return self

    def dropout_rates(self) -> list[float]:
        if isinstance(self.dropout, list):
            return list(self.dropout)
        return [self.dropout] * len(self.units)


class Regularizer(_Strict):
    kind: Literal["l1", "l2"]
    factor: Annotated[float, Field(gt=0.0)]


class Optimizer(_Strict):
    name: Literal["adam", "rmsprop", "sgd"]
    learning_rate: Annotated[float, Field(gt=0.0)] | None = None  # None: Keras' default
    momentum: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0  # sgd and rmsprop
    nesterov: bool = False  # sgd


class ModelConfig(_Strict):
    """The model vocabulary. Every variant resolves to one of these."""

    preprocess: Literal["none", "unit", "centered"] = "unit"
    conv: list[ConvBlock] = Field(default_factory=list)
    head: Literal["flatten", "global_average"] = "flatten"
    dense: DenseStack = Field(default_factory=DenseStack)
    regularizer: Regularizer | None = None
    output_activation: Literal["softmax", "sigmoid"] = "softmax"
    loss: Literal[
        "categorical_crossentropy",
        "sparse_categorical_crossentropy",
        "binary_crossentropy",
        "mean_squared_error",
    ] = "categorical_crossentropy"
    optimizer: Optimizer = Field(default_factory=lambda: Optimizer(name="adam"))
    # Bring your own model (harness/builders.py): "package.module:function" and its keyword args.
    # The vocabulary above (conv, head, dense, regularizer, output_activation) does not apply then.
    builder: Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$")] | None = None
    args: dict[str, Any] = Field(default_factory=dict)
    inputs: Literal["images", "flat"] = "images"  # what a builder model is fed: (H, W, C) or flat vectors
    builder_source: str | None = None  # sha256 of the builder's module file, set by load_sweep (run identity)

    @field_validator("optimizer", mode="before")
    @classmethod
    def _optimizer_shorthand(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value

    @model_serializer(mode="wrap")
    def _dump_own_keys(self, handler: Any) -> dict[str, Any]:
        # Only the keys that mean something for this kind of model, so a vocabulary model's dump
        # (and its run ids) is what it was before builders existed.
        data = handler(self)
        drop = BUILDER_ONLY_KEYS if self.builder is None else VOCABULARY_ONLY_KEYS
        return {key: value for key, value in data.items() if key not in drop}

    def __hash__(self) -> int:
        return hash(canonical_json(self.model_dump(mode="json")))


BUILDER_ONLY_KEYS = frozenset({"builder", "args", "inputs", "builder_source"})
VOCABULARY_ONLY_KEYS = frozenset({"conv", "head", "dense", "regularizer", "output_activation"})


class TrainBudget(_Strict):
    """What a variant may override of the sweep's budget (everything but the seeds)."""

    epochs: PositiveInt | None = None
    batch_size: PositiveInt | None = None
    validation_split: Annotated[float, Field(ge=0.0, lt=1.0)] | None = None
    keras_backend: KerasBackend | None = None


class SeedPolicy(_Strict):
    """`seeds: {min, max, ci_half_width}`: adaptive seeds (see `harness.contracts.AdaptiveSeeds`)."""

    min: Annotated[int, Field(ge=2)] = 3  # two runs at least: one run has no interval
    max: PositiveInt = 10
    ci_half_width: Annotated[float, Field(gt=0.0, le=100.0)] = 0.5  # accuracy points, 95% interval

    @model_validator(mode="after")
    def _bounds(self) -> "SeedPolicy":
        if self.max < self.min:
            raise ValueError(f"max ({self.max}) must be at least min ({self.min})")
        if self.max > limit("seeds"):
            raise ValueError(_over_limit("seeds", f"a seed count of {self.max:,}"))
        return self

    def adaptive(self) -> AdaptiveSeeds:
        return AdaptiveSeeds(self.min, self.max, self.ci_half_width)


class Budget(_Strict):
    epochs: PositiveInt
    batch_size: PositiveInt = 32
    seeds: Annotated[list[Annotated[int, Field(ge=0, le=MAX_SEED)]], Field(min_length=1)] | SeedPolicy
    validation_split: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    deterministic: bool = False  # op determinism: slower, bit-reproducible on one machine
    keras_backend: KerasBackend | None = None  # None: $KERAS_BACKEND, else tensorflow (as Keras does)

    @field_validator("seeds", mode="before")
    @classmethod
    def _seed_count(cls, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool):
            if value < 1:
                raise ValueError("a seed count must be at least 1")
            if value > limit("seeds"):
                raise ValueError(_over_limit("seeds", f"a seed count of {value:,}"))
            return list(range(value))
        if isinstance(value, Mapping):  # adaptive: its own errors, not those of the list form
            try:
                return SeedPolicy.model_validate(value)
            except ValidationError as exc:
                error = exc.errors()[0]
                where = ".".join(str(part) for part in error["loc"])
                raise ValueError(f"{where + ': ' if where else ''}{error['msg'].removeprefix('Value error, ')}") from None
        return value

    @field_validator("seeds")
    @classmethod
    def _unique_seeds(cls, value: "list[int] | SeedPolicy") -> "list[int] | SeedPolicy":
        if isinstance(value, list) and len(set(value)) != len(value):
            raise ValueError(f"seeds must be distinct (got {value})")
        return value


class Subset(_Strict):
    train: PositiveInt | None = None
    test: PositiveInt | None = None


class DatasetFiles(_Strict):
    """A dataset on disk: `path` (npz file or idx folder) or `train`+`test` (mnist-in-csv files)."""

    path: str | None = None
    train: str | None = None
    test: str | None = None
    name: str | None = None
    # Or the user's own function returning (x_train, y_train), (x_test, y_test): "package.module:function".
    loader: Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$")] | None = None
    args: dict[str, Any] = Field(default_factory=dict)  # keyword arguments of the loader


class TunerScore(_Strict):
    """What a KerasTuner search measured of a trial (one execution): shown beside our seeds."""

    kind: str
    trial_id: str
    objective: str
    score: float


class VariantEntry(_Strict):
    name: Annotated[str, Field(min_length=1)]
    description: str | None = None
    reference: list[Annotated[float, Field(ge=0.0, le=100.0)]] = Field(default_factory=list)
    model: dict[str, Any] = Field(default_factory=dict)
    budget: TrainBudget = Field(default_factory=TrainBudget)
    tuner: TunerScore | None = None  # written by `harness tune`: the trial's own single-run score

    _reference_list = field_validator("reference", mode="before")(_as_list)


class SweepFile(_Strict):
    schema_version: int = SCHEMA_VERSION
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")]
    description: str | None = None
    dataset: Any  # a builtin name, a path, or a DatasetFiles mapping: checked by _resolve_dataset
    subset: Subset | None = None
    budget: Budget
    defaults: dict[str, Any] = Field(default_factory=dict)
    variants: list[VariantEntry] = Field(min_length=1)
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    python_path: list[str] = Field(default_factory=list)  # folders (relative to this file) for builder/loader modules

    @field_validator("schema_version")
    @classmethod
    def _known_version(cls, value: int) -> int:
        if value != SCHEMA_VERSION:
            raise ValueError(f"schema_version {value} is not supported (this harness reads {SCHEMA_VERSION})")
        return value


# --------------------------------------------------------------------------- resolved objects


@dataclasses.dataclass(frozen=True)
class DatasetRef:
    """Where the data comes from. `kind` is 'builtin', 'npz', 'idx', 'csv' or 'loader'."""

    kind: str
    name: str
    path: str | None = None
    train: str | None = None
    test: str | None = None
    loader: str | None = None  # "package.module:function" (kind 'loader')
    loader_args: str = "{}"  # its keyword arguments as canonical JSON (the ref stays hashable)
    code_root: str | None = None  # the folder the loader's module is imported from


# Vocabulary keys added after run ids were first issued, with their defaults: a model leaves them
# out of its identity while they hold the default, so every run stored before they existed keeps
# its id (and is not trained again).
LATER_KEYS_AT_DEFAULT = {"batchnorm_momentum": BATCHNORM_MOMENTUM, "batchnorm_epsilon": BATCHNORM_EPSILON}


def identity_dump(model: ModelConfig) -> dict[str, Any]:
    """The model's config as hashed into variant and run ids (see `LATER_KEYS_AT_DEFAULT`)."""
    data = model.model_dump(mode="json")
    sections = [*(data.get("conv") or []), *([data["dense"]] if isinstance(data.get("dense"), dict) else [])]
    for section in sections:
        for key, default in LATER_KEYS_AT_DEFAULT.items():
            if key in section and section[key] == default:
                del section[key]
    return data


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    model: ModelConfig
    epochs: int
    batch_size: int
    validation_split: float
    reference: tuple[float, ...] = ()
    base: str = ""  # the variant entry it came from (differs from name under a grid)
    grid_point: tuple[tuple[str, Any], ...] = ()
    code_root: str | None = None  # a builder model: the folder its module is imported from (not identity)
    keras_backend: str = "tensorflow"  # as asked: tensorflow | jax | torch | auto (resolved per run)
    tuner: TunerScore | None = None  # a variant generated by `harness tune` (not identity)

    def content(self) -> dict[str, Any]:
        """Canonical content: what the variant trains, independent of its name and of the Keras
        backend (variants that differ only by backend share a variant id; their runs differ)."""
        return {
            "model": identity_dump(self.model),
            "train": {
                "epochs": self.epochs,
                "batch_size": self.batch_size,
                "validation_split": self.validation_split,
            },
        }

    @property
    def variant_id(self) -> str:
        return content_hash(self.content())[:12]


@dataclasses.dataclass(frozen=True)
class SweepSpec:
    name: str
    source: str  # the sweep file it was read from
    dataset: DatasetRef
    subset: Subset | None
    seeds: tuple[int, ...]
    deterministic: bool
    variants: tuple[Variant, ...]
    description: str | None = None
    partial: bool = False  # `--only` kept some of the file's variants
    # Adaptive seeds: `seeds` are the candidates (0..max-1), taken in order per variant while its
    # interval is too wide (`harness.execute`); None: every variant trains every seed.
    adaptive: AdaptiveSeeds | None = None

    def with_overrides(
        self,
        *,
        seeds: int | str | None = None,
        epochs: int | None = None,
        subset: Subset | None = None,
        only: Sequence[str] = (),
        keras_backend: str | None = None,
    ) -> "SweepSpec":
        """Apply CLI overrides (`--seeds N|auto`, `--epochs`, `--subset`, `--only PATTERN`, `--keras-backend`).
        `--seeds auto` takes the file's adaptive settings, else `AdaptiveSeeds()`' defaults."""
        spec = self
        if only:
            kept = tuple(v for v in spec.variants if any(fnmatch.fnmatchcase(v.name, p) for p in only))
            if not kept:
                raise SpecError(
                    f"no variant of sweep '{spec.name}' matches {', '.join(repr(p) for p in only)}",
                    file="--only",
                    key="variants",
                )
            spec = dataclasses.replace(spec, variants=kept, partial=len(kept) < len(spec.variants))
        if seeds == "auto":
            adaptive = spec.adaptive or AdaptiveSeeds()
            spec = dataclasses.replace(spec, seeds=tuple(range(adaptive.max)), adaptive=adaptive)
        elif seeds is not None:
            if not isinstance(seeds, int):
                raise SpecError(f"expected a whole number or 'auto' (got {seeds!r})", file="--seeds", key="seeds")
            if seeds < 1:
                raise SpecError("must be at least 1", file="--seeds", key="seeds")
            if seeds > limit("seeds"):
                raise SpecError(_over_limit("seeds", f"{seeds:,} seeds"), file="--seeds", key="seeds")
            spec = dataclasses.replace(spec, seeds=tuple(range(seeds)), adaptive=None)
        if epochs is not None:
            if epochs < 1:
                raise SpecError("must be at least 1", file="--epochs", key="epochs")
            variants = tuple(dataclasses.replace(v, epochs=epochs) for v in spec.variants)
            spec = dataclasses.replace(spec, variants=variants)
        if subset is not None:
            spec = dataclasses.replace(spec, subset=subset)
        if keras_backend is not None:
            if keras_backend not in KerasBackend.__args__:
                raise SpecError(
                    f"unknown Keras backend {keras_backend!r}; expected one of {', '.join(KerasBackend.__args__)}",
                    file="--keras-backend",
                    key="keras_backend",
                )
            variants = tuple(dataclasses.replace(v, keras_backend=keras_backend) for v in spec.variants)
            spec = dataclasses.replace(spec, variants=variants)
        return spec


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def content_hash(value: Any) -> str:
    return hashlib.sha256(canonical_json(value).encode()).hexdigest()


# --------------------------------------------------------------------------- loading


class _SafeLoader(yaml.SafeLoader):
    """SafeLoader that also refuses duplicate keys (a silent overwrite hides typos)."""


def _construct_mapping(loader: _SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    """Mappings with YAML merge keys (`<<: *defaults`) supported on purpose: merged keys come first
    and the mapping's own keys override them; a key written twice in the mapping itself is an error."""
    merge_tag = "tag:yaml.org,2002:merge"
    seen: set[Any] = set()
    for key_node, _value_node in node.value:
        if key_node.tag == merge_tag:
            continue
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    loader.flatten_mapping(node)  # PyYAML's own merge-key handling (raises on a bad merge value)
    mapping: dict[Any, Any] = {}
    for key_node, value_node in node.value:
        mapping[loader.construct_object(key_node, deep=deep)] = loader.construct_object(value_node, deep=deep)
    return mapping


def _count_nodes(value: Any, budget: int) -> int:
    """Nodes of a loaded YAML value, counting every alias expansion again (a 'billion laughs' file
    is a few aliases that expand to 10**9 nodes); stops as soon as `budget` is passed."""
    count, stack = 0, [value]
    while stack:
        item = stack.pop()
        count += 1
        if count > budget:
            return count
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return count


_SafeLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    problem = getattr(exc, "problem", None) or str(exc)
    if "for merging" in str(problem):
        return f"{where}YAML merge key '<<' needs a mapping or a list of mappings to merge"
    tag = re.search(r"tag '([^']+)'", str(problem))
    if tag:
        shown = tag.group(1).replace("tag:yaml.org,2002:", "!!")
        return f"{where}YAML tag '{shown}' is not allowed (sweep files are plain data, loaded safely)"
    return f"{where}malformed YAML: {problem}"


def read_yaml(path: str | Path) -> Any:
    """Load a YAML file safely. Raise `SpecError` with the file and line on any problem."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if not path.is_file():
            raise SpecError("not a regular file", file=str(path))
        if size > limit("file_bytes"):
            raise SpecError(_over_limit("file_bytes", f"the file ({size:,} bytes)"), file=str(path))
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError("file not found", file=str(path)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(f"cannot read file: {exc}", file=str(path)) from None
    try:
        data = yaml.load(text, Loader=_SafeLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise SpecError(_yaml_problem(exc), file=str(path)) from None
    except RecursionError:
        raise SpecError("YAML nested too deeply (or a recursive alias)", file=str(path)) from None
    if _count_nodes(data, limit("yaml_nodes")) > limit("yaml_nodes"):
        raise SpecError(
            _over_limit("yaml_nodes", "the YAML, with its aliases expanded,"), file=str(path)
        )
    return data


def _loc_to_key(loc: tuple[Any, ...], prefix: str = "") -> str:
    key = prefix
    for part in loc:
        if isinstance(part, int):
            key += f"[{part}]"
        else:
            key += f".{part}" if key else str(part)
    return key


def _describe_error(err: Mapping[str, Any], known: list[str]) -> str:
    kind = err.get("type", "")
    if kind == "extra_forbidden":
        name = str(err["loc"][-1])
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return f"unknown key{hint}"
    if kind == "missing":
        return "required key is missing"
    message = str(err.get("msg", "invalid value"))
    message = message.removeprefix("Value error, ")
    if "input" in err and kind not in ("model_type", "dict_type", "list_type"):
        shown = repr(err["input"])
        if len(shown) > 60:
            shown = shown[:57] + "..."
        return f"{message} (got {shown})"
    return message


def _known_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The field names allowed at `loc`'s parent, to suggest a fix for an unknown key."""
    current: Any = model
    for part in loc[:-1]:
        if isinstance(part, int) or current is None:
            continue
        field = current.model_fields.get(part) if hasattr(current, "model_fields") else None
        if field is None:
            return []
        current = _nested_model(field.annotation)
    return list(current.model_fields) if current is not None and hasattr(current, "model_fields") else []


def _nested_model(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _nested_model(arg)
        if found is not None:
            return found
    return None


def _validate(model: type[BaseModel], data: Any, *, file: str, prefix: str = "") -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        # Report the first problem that is not a union side-branch, in one line.
        errors = exc.errors()
        err = errors[0]
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and "[" in p))  # drop union branch tags
        key = _loc_to_key(loc, prefix)
        raise SpecError(_describe_error(err, _known_keys(model, loc)), file=file, key=key or None) from None


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Merge mappings recursively; lists and scalars in `override` replace those in `base`."""
    merged = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _resolve_dataset(value: Any, *, file: Path, code_dirs: tuple[Path, ...] = ()) -> DatasetRef:
    base = file.parent
    if isinstance(value, dict):
        value = _validate(DatasetFiles, value, file=str(file), prefix="dataset")
    elif not isinstance(value, str):
        raise SpecError(
            f"expected a dataset name ({', '.join(BUILTIN_DATASETS)}), a path, or a mapping with path, "
            "train/test or loader",
            file=str(file),
            key="dataset",
        )

    def where(p: str) -> str:
        path = Path(p).expanduser()
        return str(path if path.is_absolute() else (base / path))

    if isinstance(value, str):
        if value in BUILTIN_DATASETS:
            return DatasetRef(kind="builtin", name=value)
        if "/" not in value and "." not in value:
            raise SpecError(
                f"unknown dataset '{value}'; expected one of {', '.join(BUILTIN_DATASETS)} or a path "
                "(npz file, idx folder) or {train: CSV, test: CSV}",
                file=str(file),
                key="dataset",
            )
        value = DatasetFiles(path=value)
    if value.loader is not None:
        if value.path is not None or value.train or value.test:
            raise SpecError("give either 'loader' or files ('path', 'train'+'test'), not both", file=str(file), key="dataset")
        from harness.builders import BuilderError, locate_builder

        try:
            found = locate_builder(value.loader, sweep_dir=base, extra_dirs=code_dirs)
        except (BuilderError, OSError) as exc:
            raise SpecError(str(exc), file=str(file), key="dataset.loader") from None
        try:
            args = canonical_json(value.args)
        except (TypeError, ValueError) as exc:
            raise SpecError(f"loader args must be plain data ({exc})", file=str(file), key="dataset.args") from None
        return DatasetRef(
            kind="loader", name=value.name or found.function, loader=value.loader, loader_args=args, code_root=found.root
        )
    if value.args:
        raise SpecError("'args' only applies to a dataset 'loader'", file=str(file), key="dataset.args")
    if value.path is not None and (value.train or value.test):
        raise SpecError("give either 'path' or 'train'+'test', not both", file=str(file), key="dataset")
    if value.path is not None:
        path = where(value.path)
        kind = "npz" if path.endswith(".npz") else "idx"
        return DatasetRef(kind=kind, name=value.name or Path(path).stem, path=path)
    if value.train and value.test:
        name = value.name or Path(value.train).stem.removesuffix("_train")
        return DatasetRef(kind="csv", name=name, train=where(value.train), test=where(value.test))
    raise SpecError("a dataset file needs 'path' or both 'train' and 'test'", file=str(file), key="dataset")


_PATH_PART = re.compile(r"^\d+$")


def _set_path(target: dict[str, Any], dotted: str, value: Any) -> bool:
    """Set `a.b.0.c` in nested dicts/lists. Return False when the path does not exist."""
    parts = dotted.split(".")
    node: Any = target
    for part in parts[:-1]:
        if isinstance(node, list) and _PATH_PART.match(part) and int(part) < len(node):
            node = node[int(part)]
        elif isinstance(node, dict) and part in node and isinstance(node[part], (dict, list)):
            node = node[part]
        else:
            return False
    last = parts[-1]
    if isinstance(node, list) and _PATH_PART.match(last) and int(last) < len(node):
        node[int(last)] = copy.deepcopy(value)
        return True
    if isinstance(node, dict) and last in node:
        node[last] = copy.deepcopy(value)
        return True
    return False


def _own_kind_keys(merged: dict[str, Any], *, own: Mapping[str, Any], file: str, prefix: str) -> dict[str, Any]:
    """Keep the keys that apply to the variant's kind of model (builder or vocabulary).

    Keys inherited from `defaults` that do not apply are dropped (a sweep may mix both kinds);
    a key the variant sets itself that does not apply is an error."""
    if "builder_source" in merged:
        raise SpecError("unknown key (the harness sets it from the builder's file)", file=file, key=f"{prefix}.builder_source")
    is_builder = merged.get("builder") is not None
    drop = VOCABULARY_ONLY_KEYS if is_builder else BUILDER_ONLY_KEYS - {"builder"}
    for key in own:
        if key in drop:
            problem = (
                f"'{key}' does not apply to a builder model (the builder function defines the layers)"
                if is_builder
                else f"'{key}' only applies to a builder model (add 'builder: package.module:function')"
            )
            raise SpecError(problem, file=file, key=f"{prefix}.{key}")
    return {key: value for key, value in merged.items() if key not in drop and not (key == "builder" and value is None)}


def _with_builder_source(
    model: ModelConfig, *, variant: str, file: str, prefix: str, sources: dict[str, Any], code_dirs: tuple[Path, ...] = ()
) -> tuple[ModelConfig, str]:
    """Find the builder's module file (without importing it), check the args against the
    function's signature, and put the file's content hash into the model (run identity)."""
    from harness.builders import BuilderError, check_args, locate_builder

    assert model.builder is not None
    try:
        if model.builder not in sources:
            sources[model.builder] = locate_builder(model.builder, sweep_dir=Path(file).parent, extra_dirs=code_dirs)
        source = sources[model.builder]
    except BuilderError as exc:
        raise SpecError(str(exc), file=file, key=f"{prefix}.builder") from None
    except OSError as exc:
        raise SpecError(f"cannot read the builder's module: {exc}", file=file, key=f"{prefix}.builder") from None
    try:
        check_args(source, model.args)
    except BuilderError as exc:
        raise SpecError(f"{exc} (variant '{variant}')", file=file, key=f"{prefix}.args") from None
    return model.model_copy(update={"builder_source": source.sha256}), source.root


def _format_grid_value(value: Any) -> str:
    if isinstance(value, (dict, list)):
        return canonical_json(value)
    return str(value)


def load_sweep(path: str | Path) -> SweepSpec:
    """Read, validate and expand a sweep file. Raise `SpecError` (one line) on any problem."""
    path = Path(path)
    file = str(path)
    raw = read_yaml(path)
    if not isinstance(raw, dict):
        raise SpecError("a sweep file must be a YAML mapping at the top level", file=file)
    sweep: SweepFile = _validate(SweepFile, raw, file=file)
    code_dirs = tuple((path.parent / Path(p).expanduser()).resolve() for p in sweep.python_path)
    dataset = _resolve_dataset(sweep.dataset, file=path, code_dirs=code_dirs)

    _validate(ModelConfig, sweep.defaults, file=file, prefix="defaults")

    names = [entry.name for entry in sweep.variants]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise SpecError(f"duplicate variant name '{name}'", file=file, key=f"variants[{i}].name")

    budget = sweep.budget
    from harness.backends import default_backend

    sweep_backend = budget.keras_backend or default_backend()
    grid_items = list(sweep.grid.items())
    total = len(sweep.variants)
    for _key, values in grid_items:
        total *= max(1, len(values))
        if total > limit("variants"):
            raise SpecError(
                _over_limit("variants", "the number of variants (entries x grid points)"), file=file, key="grid"
            )
    for key, values in grid_items:
        if not values:
            raise SpecError("a grid axis needs at least one value", file=file, key=f"grid.{key}")

    variants: list[Variant] = []
    builder_sources: dict[str, Any] = {}  # a builder's file is read and hashed once per load
    for i, entry in enumerate(sweep.variants):
        base_model = _own_kind_keys(
            deep_merge(sweep.defaults, entry.model), own=entry.model, file=file, prefix=f"variants[{i}].model"
        )
        base_train = {
            "epochs": entry.budget.epochs or budget.epochs,
            "batch_size": entry.budget.batch_size or budget.batch_size,
            "validation_split": (
                entry.budget.validation_split
                if entry.budget.validation_split is not None
                else budget.validation_split
            ),
            "keras_backend": entry.budget.keras_backend or sweep_backend,
        }
        prefix = f"variants[{i}].model"
        resolved = _validate(ModelConfig, base_model, file=file, prefix=prefix).model_dump(mode="json")
        full = {"model": resolved, "budget": base_train}
        for key, _values in grid_items:
            if key == "model.builder_source":
                raise SpecError("unknown key (the harness sets it from the builder's file)", file=file, key=f"grid.{key}")
            arg = key.removeprefix("model.args.")
            if resolved.get("builder") and arg != key and "." not in arg:
                full["model"]["args"].setdefault(arg, None)  # a builder arg left at its default so far
            probe = copy.deepcopy(full)
            if not _set_path(probe, key, None):
                raise SpecError(
                    f"grid key does not exist in variant '{entry.name}' (use dotted paths such as "
                    "'model.dense.dropout', 'model.conv.0.filters' or 'budget.batch_size')",
                    file=file,
                    key=f"grid.{key}",
                )
        combos = itertools.product(*(values for _key, values in grid_items)) if grid_items else [()]
        for combo in combos:
            point = tuple((key, value) for (key, _values), value in zip(grid_items, combo))
            config = copy.deepcopy(full)
            for key, value in point:
                _set_path(config, key, value)
            label = ",".join(f"{key.split('.', 1)[-1]}={_format_grid_value(v)}" for key, v in point)
            name = f"{entry.name}[{label}]" if point else entry.name
            try:
                model = ModelConfig.model_validate(config["model"])
                train = TrainBudget.model_validate(config["budget"])
            except ValidationError as exc:
                # The variant validated without the grid, so a grid value is at fault: name its axis.
                err = exc.errors()[0]
                section = "model" if exc.title == ModelConfig.__name__ else "budget"
                where = ".".join([section, *(str(p) for p in err["loc"])])
                axis = next((k for k, _v in point if where.startswith(k) or k.startswith(where)), None)
                raise SpecError(
                    f"{_describe_error(err, [])} in variant '{entry.name}' at grid point {label}",
                    file=file,
                    key=f"grid.{axis}" if axis else "grid",
                ) from None
            code_root = None
            if model.builder is not None:
                model, code_root = _with_builder_source(
                    model, variant=name, file=file, prefix=f"variants[{i}].model", sources=builder_sources,
                    code_dirs=code_dirs,
                )
            variants.append(
                Variant(
                    name=name,
                    model=model,
                    code_root=code_root,
                    tuner=entry.tuner,
                    epochs=train.epochs,
                    batch_size=train.batch_size,
                    validation_split=train.validation_split,
                    reference=tuple(entry.reference) if not point else (),
                    base=entry.name,
                    grid_point=point,
                    keras_backend=train.keras_backend or sweep_backend,
                )
            )

    seen: dict[tuple[str, str], str] = {}
    for variant in variants:
        other = seen.get((variant.variant_id, variant.keras_backend))
        if other is not None:
            raise SpecError(
                f"variants '{other}' and '{variant.name}' train exactly the same model and budget",
                file=file,
                key="variants",
            )
        seen[(variant.variant_id, variant.keras_backend)] = variant.name

    return SweepSpec(
        name=sweep.name,
        source=file,
        dataset=dataset,
        subset=sweep.subset,
        seeds=tuple(range(budget.seeds.max)) if isinstance(budget.seeds, SeedPolicy) else tuple(budget.seeds),
        adaptive=budget.seeds.adaptive() if isinstance(budget.seeds, SeedPolicy) else None,
        deterministic=budget.deterministic,
        variants=tuple(variants),
        description=sweep.description,
    )


def parse_subset(text: str) -> Subset:
    """Parse the `--subset TRAIN[:TEST]` CLI option."""
    try:
        parts = [int(p) if p else None for p in text.split(":")]
        if len(parts) > 2 or any(p is not None and p <= 0 for p in parts):
            raise ValueError
    except ValueError:
        raise SpecError(f"expected TRAIN or TRAIN:TEST positive sizes (got {text!r})", file="--subset", key="subset") from None
    return Subset(train=parts[0], test=parts[1] if len(parts) > 1 else None)
