"""User model builders: `model: {builder: "package.module:function", args: {...}}`.

A builder sweep runs the named Python code: the module is imported (in the worker processes, and
in the parent only for `--dry-run`) exactly as `python -c "import package.module"` would.

Planning never imports the user's module: `locate_builder` finds its file (the sweep file's folder
first, then `sys.path`), hashes its content (the hash is part of every run id, so editing the
function retrains) and checks the function's signature by reading the source (`ast`), so a missing
module, a missing function or an argument the function does not take is a one-line error before
anything trains. What only shows when the function runs (it raises, returns something that is not a
Keras model) becomes a FAILED record with the traceback (or, in a dry run, a one-line error).

A function whose only parameter is `hp` is a KerasTuner build function: it gets a
`keras_tuner.HyperParameters` with every arg fixed (`hp.Fixed`), so an existing `build(hp)` is a
builder as it is.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import hashlib
import importlib
import importlib.machinery
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping

if TYPE_CHECKING:
    from harness.spec import ModelConfig

# Arguments the harness passes itself (when the function takes them).
PROVIDED_ARGS = ("input_shape", "num_classes")
HP_SCALARS = (bool, int, float, str)


class BuilderError(ValueError):
    """A builder reference that cannot be used (the message is one line)."""


@dataclasses.dataclass(frozen=True)
class BuilderSource:
    """Where a builder's code lives and what its signature says (read without importing it)."""

    ref: str  # "package.module:function"
    module: str
    function: str
    file: str  # the module's source file
    root: str  # the folder the module's top-level name was found in (put first on sys.path to import)
    sha256: str  # content hash of `file`: part of the run identity
    kind: str  # "function" (keyword args), "hp" (one `hp` argument), "other" (checked when it runs)
    params: tuple[str, ...] = ()  # parameter names of a plain function
    required: tuple[str, ...] = ()  # those without a default
    var_keyword: bool = False  # takes **kwargs

    def accepts(self, name: str) -> bool:
        return self.var_keyword or name in self.params


def split_ref(ref: str) -> tuple[str, str]:
    module, sep, function = ref.partition(":")
    parts = module.split(".") if module else []
    if not sep or not function.isidentifier() or not parts or not all(p.isidentifier() for p in parts):
        raise BuilderError(f"expected 'package.module:function' (got {ref!r})")
    return module, function


def _find_module_file(module: str, roots: list[str]) -> tuple[str, str] | None:
    """(source file, root) of `module`, searching `roots` in order, without executing anything."""
    parts = module.split(".")
    for root in roots:
        spec = importlib.machinery.PathFinder.find_spec(parts[0], [root])
        for depth in range(1, len(parts)):
            if spec is None or not spec.submodule_search_locations:
                spec = None
                break
            spec = importlib.machinery.PathFinder.find_spec(".".join(parts[: depth + 1]), list(spec.submodule_search_locations))
        if spec is not None and spec.origin and spec.origin.endswith(".py") and Path(spec.origin).is_file():
            return spec.origin, root
    return None


def _signature(tree: ast.Module, function: str) -> tuple[str, tuple[str, ...], tuple[str, ...], bool] | None:
    """The kind and parameters of the last top-level binding of `function` in the module source."""
    found = None
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == function:
            args = node.args
            positional = [*args.posonlyargs, *args.args]
            names = tuple(a.arg for a in [*positional, *args.kwonlyargs])
            n_defaults = len(args.defaults)
            required = [a.arg for a in positional[: len(positional) - n_defaults]]
            required += [a.arg for a, d in zip(args.kwonlyargs, args.kw_defaults) if d is None]
            var_kw = args.kwarg is not None
            if names == ("hp",) and not var_kw and args.vararg is None:
                found = ("hp", names, tuple(required), False)
            else:
                found = ("function", names, tuple(required), var_kw)
        elif isinstance(node, ast.ClassDef) and node.name == function:
            found = ("other", (), (), True)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == function for t in targets):
                value = getattr(node, "value", None)
                if isinstance(value, ast.Constant):
                    found = ("constant", (), (), False)
                else:
                    found = ("other", (), (), True)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            if any((alias.asname or alias.name.split(".")[0]) == function for alias in node.names):
                found = ("other", (), (), True)
        elif isinstance(node, (ast.If, ast.Try, ast.With)) and found is None:
            # Conditional definitions: leave the check to the import.
            if function in {n.name for n in ast.walk(node) if isinstance(n, (ast.FunctionDef, ast.ClassDef))}:
                found = ("other", (), (), True)
    return found


def locate_builder(ref: str, *, sweep_dir: str | Path | None, extra_dirs: tuple[str | Path, ...] = ()) -> BuilderSource:
    """Find and inspect a builder without importing it: the sweep file's folder first, then the
    sweep's `python_path` folders, then `sys.path`. Raise `BuilderError` (one line)."""
    module, function = split_ref(ref)
    first = [sweep_dir] if sweep_dir is not None else []
    roots = [str(Path(p).resolve()) for p in [*first, *extra_dirs]] + [
        str(Path(p).resolve()) if p else str(Path.cwd()) for p in sys.path
    ]
    found = _find_module_file(module, list(dict.fromkeys(roots)))
    if found is None:
        where = f"the sweep file's folder ({sweep_dir}) or " if sweep_dir is not None else ""
        if extra_dirs:
            where += f"its python_path ({', '.join(map(str, extra_dirs))}) or "
        raise BuilderError(f"module '{module}' not found in {where}the Python path")
    file, root = found
    data = Path(file).read_bytes()
    try:
        tree = ast.parse(data, filename=file)
    except SyntaxError as exc:
        raise BuilderError(f"module '{module}' ({file}) has a syntax error at line {exc.lineno}: {exc.msg}") from None
    signature = _signature(tree, function)
    if signature is None:
        raise BuilderError(f"module '{module}' ({file}) defines no '{function}'")
    kind, params, required, var_kw = signature
    if kind == "constant":
        raise BuilderError(f"'{ref}' is a constant, not a function that returns a Keras model")
    return BuilderSource(
        ref=ref,
        module=module,
        function=function,
        file=file,
        root=root,
        sha256=hashlib.sha256(data).hexdigest(),
        kind=kind,
        params=params,
        required=required,
        var_keyword=var_kw,
    )


def check_args(source: BuilderSource, args: Mapping[str, Any]) -> None:
    """Check the args against the signature read from the source. Raise `BuilderError`."""
    if source.kind == "hp":
        for name, value in args.items():
            if not isinstance(value, HP_SCALARS):
                raise BuilderError(
                    f"'{source.ref}' is a KerasTuner build(hp) function: arg '{name}' becomes hp.Fixed and must be "
                    f"a number, a string or a boolean (got {type(value).__name__})"
                )
        return
    if source.kind != "function":
        return
    for name in args:
        if name in PROVIDED_ARGS:
            raise BuilderError(f"arg '{name}' is passed by the harness (from the dataset); remove it from args")
        if not source.accepts(name):
            raise BuilderError(f"'{source.ref}' takes no argument '{name}' (it takes {', '.join(source.params) or 'none'})")
    missing = [n for n in source.required if n not in args and n not in PROVIDED_ARGS]
    if missing:
        raise BuilderError(f"'{source.ref}' needs args {', '.join(missing)}")


# --------------------------------------------------------------------------- in the worker


_LOADED: dict[str, str] = {}  # module name -> content hash it was imported with


@contextlib.contextmanager
def _first_on_path(root: str) -> Iterator[None]:
    """Put `root` first on sys.path for one import, then take it off again (and write no .pyc there)."""
    sys.path.insert(0, root)
    saved = sys.dont_write_bytecode
    sys.dont_write_bytecode = True
    try:
        yield
    finally:
        sys.dont_write_bytecode = saved
        with contextlib.suppress(ValueError):
            sys.path.remove(root)


def load_builder(ref: str, *, root: str | None, expected_sha256: str | None):
    """Import the builder's module (its root first on the path) and return the function.

    The module's file must still hash to what the run was planned with: a run id names the code
    it trains, so an edit since planning is an error (re-run the sweep to plan the new code)."""
    module_name, function = split_ref(ref)
    found = _find_module_file(module_name, ([root] if root else []) + [p or str(Path.cwd()) for p in sys.path])
    if found is None:
        raise BuilderError(f"module '{module_name}' not found (root {root})")
    file, found_root = found
    sha = hashlib.sha256(Path(file).read_bytes()).hexdigest()
    if expected_sha256 is not None and sha != expected_sha256:
        raise BuilderError(
            f"{file} changed since the sweep was planned; run the sweep again to plan the edited code"
        )
    cached = sys.modules.get(module_name)
    fresh = (
        cached is not None
        and getattr(cached, "__file__", None)
        and Path(cached.__file__).resolve() == Path(file).resolve()
        and _LOADED.get(module_name) == sha
    )
    if not fresh:
        sys.modules.pop(module_name, None)
        importlib.invalidate_caches()
        with _first_on_path(found_root):
            module = importlib.import_module(module_name)
        _LOADED[module_name] = sha
    else:
        module = cached
    try:
        target = getattr(module, function)
    except AttributeError:
        raise BuilderError(f"module '{module_name}' has no attribute '{function}'") from None
    if not callable(target):
        raise BuilderError(f"'{ref}' is a {type(target).__name__}, not callable")
    return target


def hyperparameters(args: Mapping[str, Any]):
    """A `keras_tuner.HyperParameters` with every arg fixed."""
    import keras_tuner

    hp = keras_tuner.HyperParameters()
    for name, value in args.items():
        hp.Fixed(name, value)
    return hp


def takes_only_hp(function: Any) -> bool:
    import inspect

    try:
        params = list(inspect.signature(function).parameters.values())
    except (TypeError, ValueError):
        return False
    return len(params) == 1 and params[0].name == "hp" and params[0].kind is not inspect.Parameter.VAR_KEYWORD


def call_builder(function: Any, args: Mapping[str, Any], *, input_shape: tuple[int, ...], num_classes: int, ref: str):
    """Call a builder (keyword args, or a fixed `hp`) and check that it returned a Keras model."""
    import inspect

    import keras

    if takes_only_hp(function):
        model = function(hyperparameters(args))
    else:
        kwargs = dict(args)
        try:
            params = inspect.signature(function).parameters
        except (TypeError, ValueError):
            params = {}
        var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        for name, value in (("input_shape", tuple(input_shape)), ("num_classes", num_classes)):
            if var_kw or name in params:
                kwargs[name] = value
        model = function(**kwargs)
    if not isinstance(model, keras.Model):
        raise BuilderError(f"builder '{ref}' returned {type(model).__name__}, not a Keras model")
    return model


def model_input_shape(config: "ModelConfig", image_shape: tuple[int, ...]) -> tuple[int, ...]:
    """What a builder model is fed: (H, W, C) images (a channel axis added to grey images) or flat vectors."""
    if config.inputs == "flat":
        size = 1
        for dim in image_shape:
            size *= dim
        return (size,)
    return (*image_shape, 1) if len(image_shape) == 2 else tuple(image_shape)


def builder_function(config: "ModelConfig", *, root: str | None):
    """Import the variant's builder module (once per worker) and return its function. Import it
    before seeding a run: a module that makes layers or draws random numbers when imported would
    otherwise consume the seed's random state on its first run only (a run's initial weights would
    depend on whether the module was already imported in that worker)."""
    assert config.builder is not None
    return load_builder(config.builder, root=root, expected_sha256=config.builder_source)


def build_builder_model(
    config: "ModelConfig", *, root: str | None, input_shape: tuple[int, ...], num_classes: int, function: Any = None
):
    """Call the variant's builder (imported now unless `function` is given); return the (possibly
    compiled) Keras model."""
    assert config.builder is not None
    if function is None:
        function = builder_function(config, root=root)
    return call_builder(
        function, config.args, input_shape=model_input_shape(config, input_shape), num_classes=num_classes, ref=config.builder
    )


def count_builder_params(config: "ModelConfig", *, root: str | None, input_shape: tuple[int, ...], num_classes: int) -> int:
    """Build the model (imports TensorFlow and the user's module) and count its parameters."""
    import keras

    try:
        model = build_builder_model(config, root=root, input_shape=input_shape, num_classes=num_classes)
        return int(model.count_params())
    finally:
        keras.backend.clear_session(free_memory=False)


def builder_summary(variant: Any, dataset: Any, *, source: str, build: bool):
    """A `ModelSummary` of a builder variant: empty (parameters unknown until a worker builds it)
    or, with `build`, one entry holding the built model's parameter count. FLOPs stay unknown (0)."""
    from harness.architecture import LayerShape, ModelSummary
    from harness.errors import SpecError

    if not build:
        return ModelSummary(())
    config = variant.model
    try:
        params = count_builder_params(
            config, root=variant.code_root, input_shape=dataset.image_shape, num_classes=dataset.num_classes
        )
    except Exception as exc:  # noqa: BLE001 - the user's code: any failure is a one-line error here
        message = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        raise SpecError(
            f"building variant '{variant.name}' failed: {type(exc).__name__}: {message}".rstrip(": "),
            file=source,
            key="model.builder",
        ) from None
    return ModelSummary((LayerShape("builder", (), params, 0),))


def target_loss(model: Any, configured: str) -> str:
    """The loss whose target format the data gets: the user's compiled loss when the builder
    compiled its model (sparse integer labels or one-hot rows), else the variant's own."""
    if not getattr(model, "compiled", False):
        return configured
    loss = getattr(model, "loss", None)
    name = loss if isinstance(loss, str) else getattr(loss, "name", None) or getattr(loss, "__name__", "")
    return "sparse_categorical_crossentropy" if "sparse" in str(name).lower() else "categorical_crossentropy"


ACCURACY_KEYS = ("accuracy", "acc", "sparse_categorical_accuracy", "categorical_accuracy")


def normalized_history(history: Mapping[str, Any]) -> dict[str, Any]:
    """A user-compiled model's history with its accuracy metric also under 'accuracy' / 'val_accuracy'."""
    out = dict(history)
    for prefix in ("", "val_"):
        if f"{prefix}accuracy" in out:
            continue
        for key in ACCURACY_KEYS[1:]:
            if f"{prefix}{key}" in out:
                out[f"{prefix}accuracy"] = out[f"{prefix}{key}"]
                break
    return out


def evaluate_compiled(model: Any, x_test: Any, y_test: Any, labels: Any, *, batch_size: int) -> tuple[float, float]:
    """Test loss from the user's compiled loss; test accuracy as argmax of the predictions against
    the labels (the same measure for every model, whatever metrics the user compiled)."""
    import numpy as np

    result = model.evaluate(x_test, y_test, batch_size=batch_size, verbose=0, return_dict=True)
    predictions = np.asarray(model.predict(x_test, batch_size=batch_size, verbose=0))
    if predictions.ndim != 2:
        raise BuilderError(f"the model's output has shape {predictions.shape[1:]}; expected one score per class")
    accuracy = float(np.mean(np.argmax(predictions, axis=1) == np.asarray(labels)))
    return float(result["loss"]), accuracy
