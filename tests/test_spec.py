from __future__ import annotations

from pathlib import Path

import pytest

from harness.errors import SpecError
from harness.backends import BackendChoice
from harness.plan import run_id_for
from harness.spec import load_sweep, parse_subset

from conftest import SWEEPS, write_sweep

BASE = """
schema_version: 1
name: t
dataset: mnist
budget: {epochs: 1, batch_size: 32, seeds: 2}
defaults:
  dense: {units: [16]}
variants:
  - name: a
  - name: b
    model: {dense: {units: [32]}}
"""


def load_text(tmp_path: Path, text: str):
    return load_sweep(write_sweep(tmp_path / "s.yaml", text))


def error_of(tmp_path: Path, text: str) -> str:
    with pytest.raises(SpecError) as info:
        load_text(tmp_path, text)
    message = info.value.one_line()
    assert "\n" not in message
    assert str(tmp_path / "s.yaml") in message, message
    return message


@pytest.mark.parametrize("name", ["conv_table", "conv_table_cpu", "seed_notebooks", "quickstart"])
def test_shipped_sweeps_load(name: str) -> None:
    spec = load_sweep(SWEEPS / f"{name}.yaml")
    assert spec.name == name
    assert spec.variants and spec.seeds


def test_conv_table_has_all_16_wiki_rows_with_references() -> None:
    spec = load_sweep(SWEEPS / "conv_table.yaml")
    wiki = (SWEEPS.parent.parent / "shared" / "seeds" / "004_aad30b1267ca514d.txt")
    assert len(spec.variants) == 16
    assert all(v.reference for v in spec.variants)
    by_name = {v.name: v for v in spec.variants}
    assert by_name["4 conv w act dsn dr dsn dr dsn sgd (w batch normalization)"].reference == (99.58, 99.39, 99.33)
    assert by_name["4 conv w act dsn dr dsn dr dsn dr sgd (w batch normalization + l1 regularization)"].model.regularizer.kind == "l1"
    if wiki.exists():  # the names are the table's own
        text = wiki.read_text()
        for name in by_name:
            assert name in text, name


def test_cpu_conv_table_is_the_full_table_at_a_smaller_budget() -> None:
    full, cpu = (load_sweep(SWEEPS / f"{name}.yaml") for name in ("conv_table", "conv_table_cpu"))
    assert [v.name for v in cpu.variants] == [v.name for v in full.variants]
    assert [v.reference for v in cpu.variants] == [v.reference for v in full.variants]
    assert cpu.seeds == full.seeds == (0, 1, 2)
    assert cpu.subset is not None and cpu.subset.train == 12000 and cpu.subset.test is None
    assert {(v.epochs, v.batch_size, v.validation_split) for v in cpu.variants} == {(3, 128, 0.1)}
    bn_rows = 0
    for small, big in zip(cpu.variants, full.variants):
        blocks = [b for b in small.model.conv if b.batchnorm] + ([small.model.dense] if small.model.dense.batchnorm else [])
        bn_rows += bool(blocks)
        # the only architecture difference: batch-norm momentum 0.9 wherever there is batch norm
        assert all(b.batchnorm_momentum == 0.9 for b in blocks)
        undo = {
            "conv": [b.model_copy(update={"batchnorm_momentum": 0.99}) for b in small.model.conv],
            "dense": small.model.dense.model_copy(update={"batchnorm_momentum": 0.99}),
        }
        assert small.model.model_copy(update=undo) == big.model, small.name
    assert bn_rows == 4


def test_defaults_merge_and_budget_override(tmp_path: Path) -> None:
    spec = load_text(tmp_path, BASE.replace("  - name: a\n", "  - name: a\n    budget: {epochs: 3}\n"))
    a, b = spec.variants
    assert a.model.dense.units == [16] and a.epochs == 3 and a.batch_size == 32
    assert b.model.dense.units == [32] and b.epochs == 1
    assert spec.seeds == (0, 1)


def test_seed_list_and_optimizer_shorthand(tmp_path: Path) -> None:
    text = BASE.replace("seeds: 2", "seeds: [3, 7]").replace("dense: {units: [16]}", "dense: {units: [16]}\n  optimizer: sgd")
    spec = load_text(tmp_path, text)
    assert spec.seeds == (3, 7)
    assert spec.variants[0].model.optimizer.name == "sgd"


def test_grid_multiplies_variants(tmp_path: Path) -> None:
    text = BASE + "grid:\n  model.dense.dropout: [0.0, 0.5]\n  budget.batch_size: [32, 64]\n"
    spec = load_text(tmp_path, text)
    assert len(spec.variants) == 8
    names = [v.name for v in spec.variants]
    assert "a[dense.dropout=0.5,batch_size=64]" in names
    point = next(v for v in spec.variants if v.name == "b[dense.dropout=0.5,batch_size=32]")
    assert point.model.dense.dropout == 0.5 and point.batch_size == 32 and point.base == "b"
    assert point.grid_point == (("model.dense.dropout", 0.5), ("budget.batch_size", 32))


def test_cli_overrides(tmp_path: Path) -> None:
    spec = load_text(tmp_path, BASE).with_overrides(seeds=5, epochs=7, subset=parse_subset("100:20"))
    assert spec.seeds == (0, 1, 2, 3, 4)
    assert {v.epochs for v in spec.variants} == {7}
    assert spec.subset.train == 100 and spec.subset.test == 20


def test_variant_id_is_content_not_name(tmp_path: Path) -> None:
    one = load_text(tmp_path, BASE).variants[0]
    renamed = load_text(tmp_path, BASE.replace("name: a", "name: zzz")).variants[0]
    changed = load_text(tmp_path, BASE.replace("units: [16]", "units: [17]")).variants[0]
    assert one.variant_id == renamed.variant_id
    assert one.variant_id != changed.variant_id


TF = BackendChoice("tensorflow", "2.21.0", "tensorflow")


def test_run_id_is_stable_and_keyed_by_content(tmp_path: Path) -> None:
    variant = load_text(tmp_path, BASE).variants[0]
    run_id = run_id_for(variant, seed=0, data_fingerprint="abc", deterministic=False, backend=TF)
    # Pinned: a change here silently orphans every stored result, so it must be deliberate.
    assert run_id == "c09ab5db26d2d4def644"  # protocol 5 (the logged loss and NaN weights, see plan.TRAIN_PROTOCOL)
    assert variant.variant_id == "3f0783da8899"
    assert run_id_for(variant, seed=1, data_fingerprint="abc", deterministic=False, backend=TF) != run_id
    assert run_id_for(variant, seed=0, data_fingerprint="abd", deterministic=False, backend=TF) != run_id
    assert run_id_for(variant, seed=0, data_fingerprint="abc", deterministic=True, backend=TF) != run_id
    longer = load_text(tmp_path, BASE.replace("epochs: 1", "epochs: 2")).variants[0]
    assert run_id_for(longer, seed=0, data_fingerprint="abc", deterministic=False, backend=TF) != run_id
    # The Keras backend and its version are part of the identity; the variant id is not.
    jax = BackendChoice("jax", "0.10.2", "jax")
    assert run_id_for(variant, seed=0, data_fingerprint="abc", deterministic=False, backend=jax) != run_id
    newer = BackendChoice("tensorflow", "2.22.0", "tensorflow")
    assert run_id_for(variant, seed=0, data_fingerprint="abc", deterministic=False, backend=newer) != run_id


# ----------------------------------------------------------------------------- bad input


def test_malformed_yaml(tmp_path: Path) -> None:
    message = error_of(tmp_path, "name: [unclosed\nbudget: {")
    assert "malformed YAML" in message and "line" in message


def test_python_tag_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    text = BASE.replace("name: t", f"name: !!python/object/apply:os.system ['touch {marker}']")
    message = error_of(tmp_path, text)
    assert "!!python/object/apply:os.system" in message and "not allowed" in message
    assert not marker.exists()


def test_unknown_top_level_key(tmp_path: Path) -> None:
    message = error_of(tmp_path, BASE + "epochz: 3\n")
    assert "key 'epochz'" in message and "unknown key" in message


def test_unknown_model_key_suggests_fix(tmp_path: Path) -> None:
    message = error_of(tmp_path, BASE.replace("model: {dense: {units: [32]}}", "model: {dense: {unitz: [32]}}"))
    assert "key 'variants[1].model.dense.unitz'" in message
    assert "did you mean 'units'" in message


def test_unknown_optimizer(tmp_path: Path) -> None:
    message = error_of(tmp_path, BASE.replace("model: {dense: {units: [32]}}", "model: {optimizer: adagrad}"))
    assert "variants[1].model.optimizer.name" in message and "adagrad" in message


def test_dropout_outside_unit_interval(tmp_path: Path) -> None:
    message = error_of(tmp_path, BASE.replace("model: {dense: {units: [32]}}", "model: {dense: {dropout: 1.0}}"))
    assert "variants[1].model.dense.dropout" in message and "1.0" in message


def test_bad_defaults_are_named(tmp_path: Path) -> None:
    message = error_of(tmp_path, BASE.replace("dense: {units: [16]}", "dense: {units: [16], dropout: -0.1}"))
    assert "defaults.dense.dropout" in message


def test_grid_key_that_does_not_exist(tmp_path: Path) -> None:
    message = error_of(tmp_path, BASE + "grid:\n  model.dense.dropuot: [0.1]\n")
    assert "grid.model.dense.dropuot" in message and "does not exist" in message


def test_grid_value_is_validated(tmp_path: Path) -> None:
    message = error_of(tmp_path, BASE + "grid:\n  model.dense.dropout: [0.1, 2.0]\n")
    assert "dense.dropout" in message and "2.0" in message


def test_duplicate_variant_names(tmp_path: Path) -> None:
    message = error_of(tmp_path, BASE.replace("name: b", "name: a"))
    assert "duplicate variant name 'a'" in message and "variants[1].name" in message


def test_identical_variants_are_refused(tmp_path: Path) -> None:
    message = error_of(tmp_path, BASE.replace("model: {dense: {units: [32]}}", "model: {dense: {units: [16]}}"))
    assert "exactly the same" in message


def test_duplicate_yaml_keys(tmp_path: Path) -> None:
    assert "duplicate key 'name'" in error_of(tmp_path, BASE + "name: again\n")


def test_missing_required_key(tmp_path: Path) -> None:
    message = error_of(tmp_path, BASE.replace("budget: {epochs: 1, batch_size: 32, seeds: 2}", "budget: {epochs: 1}"))
    assert "budget.seeds" in message and "missing" in message


def test_unsupported_schema_version(tmp_path: Path) -> None:
    assert "schema_version 2 is not supported" in error_of(tmp_path, BASE.replace("schema_version: 1", "schema_version: 2"))


def test_unknown_dataset_name(tmp_path: Path) -> None:
    message = error_of(tmp_path, BASE.replace("dataset: mnist", "dataset: cifar11"))
    assert "key 'dataset'" in message and "cifar11" in message


def test_missing_file() -> None:
    with pytest.raises(SpecError, match="file not found"):
        load_sweep("nope/does-not-exist.yaml")


def test_top_level_must_be_mapping(tmp_path: Path) -> None:
    assert "mapping" in error_of(tmp_path, "- a\n- b\n")


def test_dense_dropout_list_must_match_layers(tmp_path: Path) -> None:
    message = error_of(tmp_path, BASE.replace("model: {dense: {units: [32]}}", "model: {dense: {units: [32], dropout: [0.1, 0.2]}}"))
    assert "one rate per dense layer" in message


@pytest.mark.parametrize("text", ["0", "abc", "1:2:3", "-5"])
def test_bad_subset_option(text: str) -> None:
    with pytest.raises(SpecError, match="--subset"):
        parse_subset(text)


def test_dataset_mapping_errors_are_named(tmp_path: Path) -> None:
    assert "key 'dataset.pth': unknown key (did you mean 'path'?)" in error_of(tmp_path, BASE.replace("dataset: mnist", "dataset: {pth: x.npz}"))
    assert "key 'dataset'" in error_of(tmp_path, BASE.replace("dataset: mnist", "dataset: [1, 2]"))
    assert "'train' and 'test'" in error_of(tmp_path, BASE.replace("dataset: mnist", "dataset: {train: a.csv}"))


def test_dataset_paths_resolve_against_the_sweep_file(tmp_path: Path) -> None:
    spec = load_text(tmp_path, BASE.replace("dataset: mnist", "dataset: {train: d/mnist_train.csv, test: d/mnist_test.csv}"))
    assert spec.dataset.kind == "csv" and spec.dataset.train == str(tmp_path / "d" / "mnist_train.csv")
    assert spec.dataset.name == "mnist"
    assert load_text(tmp_path, BASE.replace("dataset: mnist", "dataset: data/m.npz")).dataset.kind == "npz"
    assert load_text(tmp_path, BASE.replace("dataset: mnist", "dataset: {path: idx/}")).dataset.kind == "idx"


def test_only_keeps_matching_variants(tmp_path: Path) -> None:
    spec = load_text(tmp_path, BASE + "grid:\n  model.dense.dropout: [0.0, 0.5]\n")
    assert [v.name for v in spec.with_overrides(only=["b*"]).variants] == ["b[dense.dropout=0.0]", "b[dense.dropout=0.5]"]
    assert len(spec.with_overrides(only=["a*", "*0.5]"]).variants) == 3
    with pytest.raises(SpecError, match="no variant of sweep 't' matches 'zzz'"):
        spec.with_overrides(only=["zzz"])


def test_keras_backend_in_budget_variant_grid_and_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KERAS_BACKEND", raising=False)
    assert {v.keras_backend for v in load_text(tmp_path, BASE).variants} == {"tensorflow"}
    monkeypatch.setenv("KERAS_BACKEND", "jax")  # as Keras: the environment decides when the sweep does not
    assert {v.keras_backend for v in load_text(tmp_path, BASE).variants} == {"jax"}
    text = BASE.replace("seeds: 2}", "seeds: 2, keras_backend: auto}")
    assert {v.keras_backend for v in load_text(tmp_path, text).variants} == {"auto"}
    per_variant = load_text(tmp_path, text.replace("  - name: a\n", "  - name: a\n    budget: {keras_backend: jax}\n"))
    assert per_variant.variants[0].keras_backend == "jax"
    grid = load_text(tmp_path, BASE + "grid:\n  budget.keras_backend: [tensorflow, jax]\n").variants
    assert [v.keras_backend for v in grid] == ["tensorflow", "jax", "tensorflow", "jax"]
    assert grid[0].name.endswith("[keras_backend=tensorflow]") and grid[0].variant_id == grid[1].variant_id
    spec = load_text(tmp_path, BASE).with_overrides(keras_backend="torch")
    assert {v.keras_backend for v in spec.variants} == {"torch"}
    with pytest.raises(SpecError, match="unknown Keras backend 'mxnet'"):
        load_text(tmp_path, BASE).with_overrides(keras_backend="mxnet")
    with pytest.raises(SpecError, match="budget.keras_backend"):
        load_text(tmp_path, BASE.replace("seeds: 2}", "seeds: 2, keras_backend: theano}"))


BATCHNORM = """
schema_version: 1
name: bn
dataset: mnist
budget: {epochs: 1, batch_size: 32, seeds: 1}
defaults:
  conv:
    - {filters: [8], batchnorm: true}
  dense: {units: [16], batchnorm: true}
variants:
  - name: keras_default
  - name: fast_stats
    model:
      conv:
        - {filters: [8], batchnorm: true, batchnorm_momentum: 0.9, batchnorm_epsilon: 1.0e-5}
      dense: {batchnorm_momentum: 0.9}
"""


def test_batchnorm_momentum_and_epsilon_in_the_vocabulary(tmp_path: Path) -> None:
    default, fast = load_text(tmp_path, BATCHNORM).variants
    assert default.model.conv[0].batchnorm_momentum == 0.99 and default.model.dense.batchnorm_epsilon == 0.001
    assert fast.model.conv[0].batchnorm_momentum == 0.9 and fast.model.conv[0].batchnorm_epsilon == 1e-5
    assert fast.model.dense.batchnorm_momentum == 0.9 and fast.model.dense.batchnorm_epsilon == 0.001
    # a part of the run identity: the stored config and the content hash both carry it
    assert fast.model.model_dump(mode="json")["dense"]["batchnorm_momentum"] == 0.9
    assert fast.content()["model"]["conv"][0]["batchnorm_momentum"] == 0.9
    assert fast.variant_id != default.variant_id


def test_batchnorm_defaults_keep_the_run_ids_issued_before_them(tmp_path: Path) -> None:
    default = load_text(tmp_path, BATCHNORM).variants[0]
    content = default.content()["model"]
    assert "batchnorm_momentum" not in content["dense"] and "batchnorm_epsilon" not in content["conv"][0]
    # spelled out at their defaults, the same identity as left out
    spelled = BATCHNORM.replace("{filters: [8], batchnorm: true}\n  dense: {units: [16], batchnorm: true}",
                                "{filters: [8], batchnorm: true, batchnorm_momentum: 0.99}\n"
                                "  dense: {units: [16], batchnorm: true, batchnorm_epsilon: 0.001}")
    assert spelled != BATCHNORM
    assert load_text(tmp_path, spelled).variants[0].variant_id == default.variant_id
    # variant ids of the shipped sweeps as issued before batch-norm momentum existed (stores keep them)
    conv = {v.name: v.variant_id for v in load_sweep(SWEEPS / "conv_table.yaml").variants}
    assert conv["4 conv w act dsn dr dsn dr dsn sgd (w batch normalization)"] == "5f71dfdd5187"
    assert conv["2 conv layers w dropout"] == "e146126d2511"
    notebooks = {v.name: v.variant_id for v in load_sweep(SWEEPS / "seed_notebooks.yaml").variants}
    assert notebooks["seed000_256x4_sigmoid_raw"] == "4a7c9d754189"


@pytest.mark.parametrize(
    ("setting", "key", "shown"),
    [
        ("batchnorm_momentum: 1.0", "dense.batchnorm_momentum", "1.0"),
        ("batchnorm_momentum: -0.1", "dense.batchnorm_momentum", "-0.1"),
        ("batchnorm_epsilon: 0", "dense.batchnorm_epsilon", "0"),
        ("batchnorm_epsilon: 2", "dense.batchnorm_epsilon", "2"),
        ("batchnorm_momentum: fast", "dense.batchnorm_momentum", "fast"),
        ("batchnorm_momentom: 0.9", "dense.batchnorm_momentom", "batchnorm_momentum"),
    ],
)
def test_bad_batchnorm_settings_are_named(tmp_path: Path, setting: str, key: str, shown: str) -> None:
    message = error_of(tmp_path, BATCHNORM.replace("dense: {batchnorm_momentum: 0.9}", f"dense: {{{setting}}}"))
    assert f"variants[1].model.{key}" in message and shown in message, message


def test_grid_over_batchnorm_momentum(tmp_path: Path) -> None:
    spec = load_text(tmp_path, BATCHNORM + "grid:\n  model.dense.batchnorm_momentum: [0.5, 0.9, 0.99]\n")
    assert len(spec.variants) == 6 and len({v.variant_id for v in spec.variants}) == 6
    assert [v.model.dense.batchnorm_momentum for v in spec.variants[:3]] == [0.5, 0.9, 0.99]
