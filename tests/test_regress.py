from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from harness.cli import cli
from harness.records import RunFlag, RunStatus
from harness.regress import Verdict, compare, load_baseline
from harness.errors import UserError
from harness.store import SQLiteStore

from test_records import make_record

BASE = [98.00, 98.12, 97.91, 98.07, 97.95]  # 5 seeds, std about 0.09


def baseline_of(variants: dict[str, list[float]]) -> dict:
    return {"format": "harness-baseline", "version": 1, "sweep": "nightly",
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


def fill_store(path: Path, accuracies: dict[str, list[float]], *, failed: tuple[str, ...] = (),
               diverged: tuple[str, ...] = (), versions: dict | None = None, fingerprint: str = "f") -> None:
    with SQLiteStore(path) as store:
        plan = []
        for variant, values in accuracies.items():
            for seed, acc in enumerate(values):
                status = (RunStatus.FAILED if variant in failed else RunStatus.DIVERGED if variant in diverged
                          else RunStatus.DONE)
                flags = (RunFlag.NEAR_CHANCE,) if status is RunStatus.DONE and acc < 20 else ()
                record = make_record(run_id=f"{variant}-{seed}-{acc}-{status.value}", variant=variant, variant_id=variant,
                                     seed=seed, status=status, flags=flags,
                                     metrics={"test_accuracy": acc / 100} if status is RunStatus.DONE else {},
                                     history={}, **({"versions": versions} if versions else {}))
                store.put(record)
                plan.append((record.run_id, variant, seed))
        info = {"variants": [{"name": v, "params": 1, "reference": []} for v in accuracies], "seeds": [0, 1, 2, 3, 4],
                "dataset": {"fingerprint": fingerprint}}
        store.save_plan("nightly", source="sweeps/nightly.yaml", info=info, runs=plan)


def test_cli_baseline_then_regress(tmp_path: Path) -> None:
    runner = CliRunner()
    fill_store(tmp_path / "base.db", {"a": BASE, "b": BASE, "c": BASE})
    baseline = tmp_path / "baselines" / "nightly.json"
    result = runner.invoke(cli, ["baseline", "save", "--sweep", "nightly", "--store", str(tmp_path / "base.db"), "--out", str(baseline)])
    assert result.exit_code == 0, result.output + result.stderr
    saved = json.loads(baseline.read_text())
    assert saved["format"] == "harness-baseline" and saved["version"] == 2
    assert saved["variants"]["a"]["accuracy"] == pytest.approx(BASE)

    fill_store(tmp_path / "ok.db", {"a": BASE[::-1], "b": BASE, "c": BASE})
    ok = runner.invoke(cli, ["regress", "--sweep", "nightly", "--baseline", str(baseline), "--store", str(tmp_path / "ok.db")])
    assert ok.exit_code == 0, ok.output
    assert "0 regressed, 0 missing, 0 improved, 3 unchanged" in ok.output

    fill_store(tmp_path / "bad.db", {"a": [x - 1.0 for x in BASE], "b": BASE, "c": BASE}, failed=("c",))
    out = tmp_path / "regress.md"
    bad = runner.invoke(cli, ["regress", "--sweep", "nightly", "--baseline", str(baseline), "--store", str(tmp_path / "bad.db"), "--out", str(out)])
    assert bad.exit_code == 1
    assert "2 regressed, 0 missing, 0 improved, 1 unchanged" in bad.output  # c: all five failed tonight
    assert "| regressed | a |" in bad.output and "| regressed | c |" in bad.output and "-1.00" in bad.output
    assert "5 failed (baseline 0)" in bad.output
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


# --------------------------------------------------------------------------- the gate of issue 9


def run_regress(tmp_path: Path, baseline: Path, *extra: str, store: str = "t.db"):
    args = ["regress", "--sweep", "nightly", "--baseline", str(baseline), "--store", str(tmp_path / store), *extra]
    return CliRunner().invoke(cli, [str(a) for a in args])


def saved_baseline(tmp_path: Path, accuracies: dict[str, list[float]], **kw) -> Path:
    fill_store(tmp_path / "base.db", accuracies, **kw)
    out = tmp_path / "baseline.json"
    result = CliRunner().invoke(cli, ["baseline", "save", "--sweep", "nightly", "--store", str(tmp_path / "base.db"),
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


def test_tampered_baseline_one_point_higher_fails(tmp_path: Path) -> None:
    baseline = saved_baseline(tmp_path, {"a": BASE})
    fill_store(tmp_path / "t.db", {"a": BASE})
    assert run_regress(tmp_path, baseline).exit_code == 0
    data = json.loads(baseline.read_text())
    data["variants"]["a"]["accuracy"] = [x + 1.0 for x in data["variants"]["a"]["accuracy"]]
    baseline.write_text(json.dumps(data))
    result = run_regress(tmp_path, baseline)
    assert result.exit_code == 1 and "| regressed | a |" in result.output


def test_all_seeds_diverged_tonight_is_a_regression_not_missing() -> None:
    from harness.regress import Health, VariantResult

    tonight = {"a": VariantResult((), (), Health(diverged=5))}
    row = compare(baseline_of({"a": BASE}), tonight)[0]
    assert row.verdict is Verdict.REGRESSED and row.health == "5 diverged (baseline 0)"


def test_one_collapsed_seed_among_five_is_caught() -> None:
    from scipy import stats

    from harness.regress import Health, VariantResult

    tonight = [x - 1.0 for x in BASE[:4]] + [9.8]  # a real one-point drop, and one seed collapsed
    assert stats.ttest_ind(tonight, BASE, equal_var=False, alternative="less").pvalue > 0.1  # Welch alone: hidden
    # without the health count, the robust test still sees the drop
    plain = compare(baseline_of({"a": BASE}), {"a": tonight})[0]
    assert plain.verdict is Verdict.REGRESSED and plain.p_value > 0.1 and plain.robust_p < 0.01
    assert plain.robust_test == "Mann-Whitney U"  # 5 pairs cannot reach 0.01 by permutation
    # the same seeds with the health count: caught on health too
    counted = compare(baseline_of({"a": BASE}), {"a": VariantResult(tuple(tonight), tuple(range(5)), Health(collapsed=1))})[0]
    assert counted.verdict is Verdict.REGRESSED and "1 collapsed (baseline 0)" in counted.health


def test_single_seed_falls_back_to_the_threshold_with_low_n() -> None:
    row = compare(baseline_of({"a": [98.01]}), {"a": [90.0]})[0]
    assert row.verdict is Verdict.REGRESSED and row.low_n and "low n" in row.note
    assert compare(baseline_of({"a": [98.01]}), {"a": [97.95]})[0].verdict is Verdict.UNCHANGED  # within 0.2


@pytest.mark.parametrize("option", ["--alpha", "--threshold"])
def test_nan_options_exit_2_in_one_line(tmp_path: Path, option: str) -> None:
    baseline = saved_baseline(tmp_path, {"a": BASE})
    fill_store(tmp_path / "t.db", {"a": [x - 16 for x in BASE]})
    result = run_regress(tmp_path, baseline, option, "nan")
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1 and option in result.stderr
    with pytest.raises(UserError):
        compare(baseline_of({"a": BASE}), {"a": BASE}, **{option[2:]: float("nan")})


@pytest.mark.parametrize("entry, key", [
    ({"seeds": [0, 1]}, "variants.a.accuracy"),
    ({"accuracy": "98.0"}, "variants.a.accuracy"),
    ({"accuracy": [98.0, None]}, "variants.a.accuracy"),
    ({"accuracy": [98.0, 250.0]}, "variants.a.accuracy"),
    ({"accuracy": [98.0], "seeds": ["0"]}, "variants.a.seeds"),
    ({"accuracy": [98.0], "diverged": -1}, "variants.a.diverged"),
    ("98.0", "variants.a"),
])
def test_malformed_baselines_exit_2_in_one_line(tmp_path: Path, entry, key: str) -> None:
    fill_store(tmp_path / "t.db", {"a": BASE})
    baseline = tmp_path / "b.json"
    baseline.write_text(json.dumps({"format": "harness-baseline", "version": 1, "variants": {"a": entry}}))
    result = run_regress(tmp_path, baseline)
    assert result.exit_code == 2, result.output
    assert len(result.stderr.strip().splitlines()) == 1 and key in result.stderr and "b.json" in result.stderr


def test_committed_version_1_baseline_still_reads() -> None:
    data = load_baseline(Path(__file__).parent.parent / "reports" / "baselines" / "nightly.json")
    assert set(data["variants"]) >= {"dnn_25x2", "cnn_16_32_dropout"}


def test_environment_change_is_its_own_section_and_fails_unless_allowed(tmp_path: Path) -> None:
    versions = {"tensorflow": "2.21.0", "keras": "3.15.1", "numpy": "2.4.6", "python": "3.11.7"}
    baseline = saved_baseline(tmp_path, {"a": BASE}, versions=versions)
    assert json.loads(baseline.read_text())["environment"]["tensorflow"] == "2.21.0"
    fill_store(tmp_path / "t.db", {"a": BASE}, versions={**versions, "python": "3.11.9"})  # patch level: same
    assert run_regress(tmp_path, baseline).exit_code == 0
    fill_store(tmp_path / "x.db", {"a": BASE}, versions={**versions, "tensorflow": "2.22.0"}, fingerprint="other")
    result = run_regress(tmp_path, baseline, store="x.db")
    assert result.exit_code == 1 and "## Environment differences" in result.output
    assert "| tensorflow | 2.21.0 | 2.22.0 |" in result.output and "| dataset | f | other |" in result.output
    assert "0 regressed" in result.output
    assert run_regress(tmp_path, baseline, "--allow-env-change", store="x.db").exit_code == 0


# --------------------------------------------------------------------------- history and step detection


def nights(means: list[float], *, noise: float = 0.05, seed: int = 0) -> list[dict]:
    from harness.regress import Health, VariantResult, history_entry

    rng = np.random.default_rng(seed)
    return [
        history_entry({"a": VariantResult(tuple(m + noise * rng.standard_normal(5)), tuple(range(5)), Health())},
                      {"sweep": "nightly"}, at=f"night-{i:02d}")
        for i, m in enumerate(means)
    ]


def test_step_fit_finds_a_step_and_nothing_in_noise() -> None:
    from harness.regress import l1_segments, step_penalty

    rng = np.random.default_rng(1)
    flat = list(98.0 + 0.05 * rng.standard_normal(30))
    assert len(l1_segments(flat, penalty=step_penalty(flat))) == 1
    step = flat[:15] + [x - 0.5 for x in flat[15:]]
    segments = l1_segments(step, penalty=step_penalty(step))
    assert [(s.start, s.end) for s in segments] == [(0, 15), (15, 30)]
    assert segments[0].level - segments[1].level == pytest.approx(0.5, abs=0.05)


def test_drift_and_fall_back_after_an_improvement_are_found() -> None:
    from harness.regress import detect_drifts

    assert detect_drifts(nights([98.0] * 20))[0] == []
    drifts, _ = detect_drifts(nights([98.0 - 0.06 * i for i in range(20)]))  # a slow drift: 0.06 a night
    assert len(drifts) == 1 and drifts[0].fell_by > 0.5
    # up by 0.5 for a while, then back: tonight equals an old baseline, yet it fell
    drifts, _ = detect_drifts(nights([98.0] * 8 + [98.5] * 8 + [98.0] * 6))
    assert len(drifts) == 1 and drifts[0].peak == pytest.approx(98.5, abs=0.05)
    assert drifts[0].since == "night-16" and "fell" in drifts[0].text


def test_cli_history_is_appended_and_drawn(tmp_path: Path) -> None:
    from harness.regress import load_history

    baseline = saved_baseline(tmp_path, {"a": BASE})
    history = tmp_path / "baselines" / "nightly-history.jsonl"
    history.parent.mkdir()
    history.write_text("".join(json.dumps(e) + "\n" for e in nights([98.5] * 6)))
    fill_store(tmp_path / "t.db", {"a": BASE})
    out = tmp_path / "reports" / "nightly-regress.md"
    result = run_regress(tmp_path, baseline, "--history", history, "--out", out)
    assert result.exit_code == 0, result.output  # tonight equals the baseline...
    assert len(load_history(history)) == 7 and "## History" in result.output
    assert "**drift**: a: fell" in result.output  # ...but it is 0.5 under the last six nights
    assert (out.parent / "nightly-regress" / "trend.png").stat().st_size > 1000
    assert run_regress(tmp_path, baseline, "--history", history, "--fail-on-drift").exit_code == 1
    history.write_text("{broken\n")
    broken = run_regress(tmp_path, baseline, "--history", history)
    assert broken.exit_code == 2 and "line 1 is not JSON" in broken.stderr
