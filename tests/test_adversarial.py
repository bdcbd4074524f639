"""The adversarial corpus (tests/adversarial/): every bad sweep file, run through the real CLI in a
subprocess, exits 2 with one line naming the file, in bounded time, and creates nothing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from harness.cli import cli
from harness.devices import plan_workers
from harness.errors import SpecError
from harness.spec import load_sweep, read_yaml

REPO = Path(__file__).resolve().parents[1]
CORPUS = sorted((REPO / "tests" / "adversarial").glob("*.yaml"))
PWNED = Path("/tmp/harness-adversarial-pwned")

# What each file's one line must say (besides its name).
EXPECTED = {
    "alias_bomb": "aliases expanded",
    "bad_merge_key": "merge key",
    "duplicate_key": "duplicate key",
    "factor_nan": "finite",
    "grid_huge": "number of variants",
    "lr_inf": "finite",
    "momentum_inf": "finite",
    "python_tag": "not allowed",
    "seed_2_32": "less than or equal to 4294967295",
    "seed_2_63": "less than or equal to 4294967295",
    "seed_count_huge": "over the limit",
    "split_leaves_nothing": "leaves 0 to train on",
}


def test_the_corpus_is_the_expected_one() -> None:
    assert {path.stem for path in CORPUS} == set(EXPECTED)


@pytest.mark.parametrize("path", CORPUS, ids=lambda p: p.stem)
def test_bad_sweep_exits_2_with_one_line_and_creates_nothing(path: Path, tmp_path: Path, data_dir: Path) -> None:
    store = tmp_path / "h.db"
    env = {**os.environ, "PYTHONPATH": str(REPO), "HARNESS_DATA_DIR": str(data_dir), "HARNESS_OFFLINE": "1"}
    # The timeout is the "bounded time" guard: an alias bomb or a 10**8 grid must not hang or grow.
    result = subprocess.run(
        [sys.executable, "-m", "harness", "sweep", str(path), "--store", str(store)],
        capture_output=True, text=True, timeout=180, env=env, cwd=tmp_path,
    )
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("harness: error: "), result.stderr
    assert str(path) in lines[0] and EXPECTED[path.stem] in lines[0], lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    assert not store.exists() and list(tmp_path.iterdir()) == []
    assert not PWNED.exists()


def test_merge_keys_are_supported_on_purpose(tmp_path: Path) -> None:
    path = tmp_path / "merge.yaml"
    path.write_text(
        """
schema_version: 1
name: merged
dataset: mnist
budget: {epochs: 1, seeds: 1}
variants:
  - name: a
    model: &base {dense: {units: [16]}, optimizer: sgd}
  - name: b
    model:
      <<: *base
      optimizer: adam
""",
        encoding="utf-8",
    )
    spec = load_sweep(path)
    by_name = {v.name: v.model for v in spec.variants}
    assert by_name["b"].dense.units == [16] and by_name["b"].optimizer.name == "adam"
    assert by_name["a"].optimizer.name == "sgd"


def test_size_limits_say_the_limit_and_how_to_raise_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "s.yaml"
    path.write_text("name: x\n" + "# padding\n" * 50, encoding="utf-8")
    monkeypatch.setenv("HARNESS_MAX_SWEEP_BYTES", "100")
    with pytest.raises(SpecError, match="over the limit of 100 .*HARNESS_MAX_SWEEP_BYTES"):
        read_yaml(path)
    monkeypatch.setenv("HARNESS_MAX_SWEEP_BYTES", "100000")
    assert read_yaml(path) == {"name": "x"}


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--timeout", "nan"], "--timeout"),
        (["--timeout", "inf"], "--timeout"),
        (["--seeds", "100000000", "--dry-run"], "over the limit"),
    ],
)
def test_bad_flags_exit_2_with_one_line(args: list[str], needle: str, tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["sweep", str(REPO / "sweeps" / "quickstart.yaml"), "--store", str(tmp_path / "h.db"), *args])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0], result.output
    assert not (tmp_path / "h.db").exists()


def test_more_workers_than_runs_start_no_idle_processes() -> None:
    slots = plan_workers(gpus=[], pending=6, cpu_count=2, workers=1000)
    assert len(slots) == 6


def _npz_sweep(tmp_path: Path, data: Path) -> Path:
    path = tmp_path / "s.yaml"
    path.write_text(
        f"schema_version: 1\nname: d\ndataset: {{path: {data}}}\nbudget: {{epochs: 1, seeds: 1}}\nvariants:\n  - name: v\n",
        encoding="utf-8",
    )
    return path


@pytest.mark.parametrize("damage", ["truncated", "not_zip", "empty"])
def test_damaged_npz_is_one_line_naming_it(damage: str, tmp_path: Path, data_dir: Path) -> None:
    good = (data_dir / "mnist.npz").read_bytes()
    data = tmp_path / "data.npz"
    data.write_bytes({"truncated": good[: len(good) // 2], "not_zip": b"\x93NUMPY" + b"x" * 200, "empty": b""}[damage])
    result = CliRunner().invoke(cli, ["sweep", str(_npz_sweep(tmp_path, data)), "--store", str(tmp_path / "h.db"), "--dry-run"])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and str(data) in lines[0] and "npz" in lines[0], result.output
    assert "pickled" not in lines[0]
    assert not (tmp_path / "h.db").exists()


def test_bad_test_csv_is_reported_under_its_own_name(tmp_path: Path) -> None:
    train, test = tmp_path / "mnist_train.csv", tmp_path / "mnist_test.csv"
    row = lambda label: ",".join([str(label)] + ["0"] * 784)  # noqa: E731
    train.write_text("\n".join(row(i % 10) for i in range(20)) + "\n", encoding="utf-8")
    test.write_text("label,a,b\n1,2\n", encoding="utf-8")
    sweep = tmp_path / "s.yaml"
    sweep.write_text(
        f"schema_version: 1\nname: c\ndataset: {{train: {train}, test: {test}}}\nbudget: {{epochs: 1, seeds: 1}}\n"
        "variants:\n  - name: v\n",
        encoding="utf-8",
    )
    result = CliRunner().invoke(cli, ["sweep", str(sweep), "--store", str(tmp_path / "h.db"), "--dry-run"])
    assert result.exit_code == 2, result.output
    assert str(test) in result.output and str(train) not in result.output
