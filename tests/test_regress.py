from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from harness.cli import cli
from harness.records import RunStatus
from harness.regress import Verdict, compare, load_baseline
from harness.errors import UserError
from harness.store import SQLiteStore

from test_records import make_record

BASE = [98.00, 98.12, 97.91, 98.07, 97.95]  # 5 seeds, std about 0.09


def baseline_of(variants: dict[str, list[float]]) -> dict:
    return {"format": "harness-baseline", "version": 1, "sweep": "n",
            "variants": {k: {"variant_id": k, "seeds": list(range(len(v))), "accuracy": v} for k, v in variants.items()}}


def verdicts(baseline, current, **kw):
    return {r.variant: r.verdict for r in compare(baseline, current, **kw)}


def test_one_point_drop_over_five_seeds_is_flagged() -> None:
    rows = compare(baseline_of({"a": BASE}), {"a": [x - 1.0 for x in BASE]})
    assert rows[0].verdict is Verdict.REGRESSED
    assert rows[0].delta == pytest.approx(-1.0) and rows[0].p_value < 0.01


def test_seed_noise_of_the_baseline_spread_is_not_flagged() -> None:
    rng = np.random.default_rng(7)
    spread = float(np.std(BASE, ddof=1))
    for _ in range(20):  # fresh seeds from the same distribution: never a regression
        tonight = list(np.mean(BASE) + rng.normal(0, spread, size=5))
        assert verdicts(baseline_of({"a": BASE}), {"a": tonight})["a"] is Verdict.UNCHANGED


def test_drop_needs_both_size_and_significance() -> None:
    small_but_sure = [x - 0.15 for x in BASE]  # significant, under the 0.2-point threshold
    assert verdicts(baseline_of({"a": BASE}), {"a": small_but_sure})["a"] is Verdict.UNCHANGED
    noisy = [99.5, 96.0, 98.9, 95.8, 97.6]  # mean 0.4 lower, but far too noisy to call
    assert verdicts(baseline_of({"a": BASE}), {"a": noisy})["a"] is Verdict.UNCHANGED
    assert verdicts(baseline_of({"a": BASE}), {"a": [x + 1.0 for x in BASE]})["a"] is Verdict.IMPROVED


def test_missing_and_new_variants_are_reported() -> None:
    result = verdicts(baseline_of({"a": BASE, "gone": BASE}), {"a": BASE, "fresh": [97.0, 97.1]})
    assert result == {"a": Verdict.UNCHANGED, "gone": Verdict.MISSING, "fresh": Verdict.NEW}


def test_baseline_file_validation(tmp_path: Path) -> None:
    path = tmp_path / "b.json"
    path.write_text(json.dumps({"format": "other"}))
    with pytest.raises(UserError, match="not a harness baseline"):
        load_baseline(path)
    path.write_text(json.dumps({**baseline_of({}), "version": 9}))
    with pytest.raises(UserError, match="version 9 is not supported"):
        load_baseline(path)
    path.write_text("{not json")
    with pytest.raises(UserError, match="not a readable JSON"):
        load_baseline(path)


def fill_store(path: Path, accuracies: dict[str, list[float]], *, failed: tuple[str, ...] = ()) -> None:
    with SQLiteStore(path) as store:
        plan = []
        for variant, values in accuracies.items():
            for seed, acc in enumerate(values):
                status = RunStatus.FAILED if variant in failed else RunStatus.DONE
                record = make_record(run_id=f"{variant}-{seed}-{acc}", variant=variant, variant_id=variant, seed=seed,
                                     status=status, metrics={"test_accuracy": acc / 100} if status is RunStatus.DONE else {},
                                     history={})
                store.put(record)
                plan.append((record.run_id, variant, seed))
        info = {"variants": [{"name": v, "params": 1, "reference": []} for v in accuracies], "seeds": [0, 1, 2, 3, 4]}
        store.save_plan("nightly", source="sweeps/nightly.yaml", info=info, runs=plan)


def test_cli_baseline_then_regress(tmp_path: Path) -> None:
    runner = CliRunner()
    fill_store(tmp_path / "base.db", {"a": BASE, "b": BASE, "c": BASE})
    baseline = tmp_path / "baselines" / "nightly.json"
    result = runner.invoke(cli, ["baseline", "save", "--sweep", "nightly", "--store", str(tmp_path / "base.db"), "--out", str(baseline)])
    assert result.exit_code == 0, result.output + result.stderr
    saved = json.loads(baseline.read_text())
    assert saved["format"] == "harness-baseline" and saved["version"] == 1
    assert saved["variants"]["a"]["accuracy"] == pytest.approx(BASE)

    fill_store(tmp_path / "ok.db", {"a": BASE[::-1], "b": BASE, "c": BASE})
    ok = runner.invoke(cli, ["regress", "--sweep", "nightly", "--baseline", str(baseline), "--store", str(tmp_path / "ok.db")])
    assert ok.exit_code == 0, ok.output
    assert "0 regressed, 0 missing, 0 improved, 3 unchanged" in ok.output

    fill_store(tmp_path / "bad.db", {"a": [x - 1.0 for x in BASE], "b": BASE, "c": BASE}, failed=("c",))
    out = tmp_path / "regress.md"
    bad = runner.invoke(cli, ["regress", "--sweep", "nightly", "--baseline", str(baseline), "--store", str(tmp_path / "bad.db"), "--out", str(out)])
    assert bad.exit_code == 1
    assert "1 regressed, 1 missing, 0 improved, 1 unchanged" in bad.output
    assert "| regressed | a |" in bad.output and "| missing | c |" in bad.output and "-1.00" in bad.output
    assert out.read_text().strip() == bad.output.strip()


def test_cli_missing_can_fail_and_bad_baseline_exits_2(tmp_path: Path) -> None:
    runner = CliRunner()
    fill_store(tmp_path / "h.db", {"a": BASE})
    baseline = tmp_path / "b.json"
    baseline.write_text(json.dumps(baseline_of({"a": BASE, "gone": BASE})))
    args = ["regress", "--sweep", "nightly", "--baseline", str(baseline), "--store", str(tmp_path / "h.db")]
    assert runner.invoke(cli, args).exit_code == 0
    assert runner.invoke(cli, [*args, "--fail-on-missing"]).exit_code == 1
    baseline.write_text("[]")
    broken = runner.invoke(cli, args)
    assert broken.exit_code == 2 and "not a harness baseline" in broken.stderr
