"""Ray specifics on real clusters: the security defaults of the clusters the harness starts, the
dataset shipped once, the one-line error without Ray, and a multi-node cluster that loses a node
mid-sweep (`ray.cluster_utils.Cluster`, head + 2 worker nodes, in a child process of its own).

The shared behaviour (store, report, resume, retries) is in tests/test_executors.py, run on the
session's one local cluster (conftest `ray_cluster`).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from harness.execute import SweepOptions, execute_sweep
from harness.spec import load_sweep
from harness.sweep import Progress

from conftest import tiny_sweep_text, write_sweep

TESTS = Path(__file__).parent
REPO = TESTS.parent


def test_without_ray_the_ray_executor_is_a_one_line_error(tmp_path: Path) -> None:
    """A Python where `import ray` fails (a blocker on sys.path): exit 2, one line, nothing trained."""
    blocker = tmp_path / "blocker"
    (blocker / "ray").mkdir(parents=True)
    (blocker / "ray" / "__init__.py").write_text("raise ImportError('No module named ray')\n")
    sweep = write_sweep(tmp_path / "s.yaml", tiny_sweep_text(seeds=1, train=300, test=100))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocker), str(REPO)])}
    result = subprocess.run(
        [sys.executable, "-m", "harness", "sweep", str(sweep), "--store", str(tmp_path / "h.db"), "--executor", "ray"],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--executor ray needs Ray" in lines[0] and '.[ray]' in lines[0]
    assert not (tmp_path / "h.db").exists()


def test_address_without_ray_executor_is_refused() -> None:
    from click.testing import CliRunner

    from harness.cli import cli

    result = CliRunner().invoke(cli, ["sweep", "x.yaml", "--address", "auto"])
    assert result.exit_code == 2


def test_an_address_where_nothing_answers_is_one_line_in_bounded_time(tmp_path: Path, data_dir: Path) -> None:
    """Ray retries a dead address for minutes; the harness asks the port first: exit 2, one line
    naming the address, within seconds, nothing written (a sweep and a dry run alike)."""
    import socket
    import time

    with socket.socket() as probe:  # a port nothing listens on (bound, then closed)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    sweep = write_sweep(tmp_path / "s.yaml", tiny_sweep_text(seeds=1, train=300, test=100))
    for extra in ([], ["--dry-run"]):
        started = time.monotonic()
        result = subprocess.run(
            [sys.executable, "-m", "harness", "sweep", str(sweep), "--store", str(tmp_path / "h.db"), "--data-dir",
             str(data_dir), "--executor", "ray", "--address", f"127.0.0.1:{port}", *extra],
            capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        assert result.returncode == 2, result.stderr[-2000:]
        lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
        assert len(lines) == 1 and f"127.0.0.1:{port}" in lines[0] and "nothing answers" in lines[0], result.stderr
        assert time.monotonic() - started < 60
        assert not (tmp_path / "h.db").exists()
    from harness.ray_executor import _unreachable

    assert _unreachable("auto") is None and _unreachable("ray://10.0.0.5") is None  # Ray's to resolve


def test_gpus_on_ray_are_ray_s_to_give(tmp_path: Path) -> None:
    """--gpus names this machine's GPUs; on Ray it may only say none (CPU actors): anything else
    is one line, exit 2, before Ray is imported or anything written."""
    from click.testing import CliRunner

    from harness.cli import cli
    from harness.errors import UserError
    from harness.execute import ExecutorKind, SweepOptions

    sweep = write_sweep(tmp_path / "s.yaml", tiny_sweep_text(seeds=1, train=300, test=100))
    result = CliRunner().invoke(cli, ["sweep", str(sweep), "--store", str(tmp_path / "h.db"), "--executor", "ray", "--gpus", "0"])
    assert result.exit_code == 2 and "--gpus" in result.output and "Ray gives each actor its GPU" in result.output
    assert not (tmp_path / "h.db").exists()
    with pytest.raises(UserError):
        SweepOptions(executor=ExecutorKind.RAY, gpus=(0, 1))
    assert SweepOptions(executor=ExecutorKind.RAY, gpus=()).gpus == ()


def test_a_gpu_cluster_is_counted_by_ray_and_sized_by_its_nodes_nvidia_smi() -> None:
    """Ray's GPU count per node, each sized as the smallest GPU that node lists (which of them Ray
    hands an actor is its choice); unknown (0) where the node listed none; the sweep then plans
    for a GPU: its memory share from the smallest, --gpus none keeps the cluster's GPUs out."""
    import dataclasses

    from harness.execute import ExecutorKind, SweepOptions, _Machine, _memory_share, _on_cluster
    from harness.ray_executor import gpu_nodes, node_gpus, usable_resources

    listed = [(0, "NVIDIA H100 80GB HBM3", 81559), (1, "NVIDIA A100-SXM4-40GB", 40960)]
    two = node_gpus(2.0, listed, node="10.0.0.5", first=3)
    assert [g.index for g in two] == [3, 4] and {g.memory_mib for g in two} == {40960}
    assert "A100" in two[0].name and "10.0.0.5" in two[0].name
    assert len(node_gpus(1.0, listed, node="n")) == 1  # Ray told of fewer GPUs than the node has
    assert [g.memory_mib for g in node_gpus(3.0, None, node="n")] == [0, 0, 0]  # no answer
    assert node_gpus(1.0, [(0, "X", 0), (1, "X", 16000)], node="n")[0].memory_mib == 16000
    assert node_gpus(1.0, [(0, "X", 0)], node="n")[0].memory_mib == 0
    nodes = [
        {"Alive": True, "Resources": {"CPU": 8.0, "GPU": 2.0}},
        {"Alive": False, "Resources": {"CPU": 8.0, "GPU": 8.0}},  # a dead node
        {"Alive": True, "Resources": {"CPU": 4.0}},
        {"Alive": True, "Resources": {"CPU": 4.0, "GPU": 0.5}},  # no whole GPU: no GPU actor fits
    ]
    assert gpu_nodes(nodes) == nodes[:1]
    assert usable_resources({"CPU": 8.0, "GPU": 2.0}, ()) == {"CPU": 8.0}
    assert usable_resources({"CPU": 8.0, "GPU": 2.0}, None) == {"CPU": 8.0, "GPU": 2.0}
    cluster = _Machine(gpus=tuple(two + node_gpus(1.0, listed[:1], node="b", first=5)), cpus=(0,),
                       backend_context=None, backends={"tensorflow": 1})
    ray_options = SweepOptions(executor=ExecutorKind.RAY, runs_per_gpu=2)
    assert _memory_share(cluster, ray_options) == int(40960 * 2**20 * 0.9 / 2)
    cpu_only = dataclasses.replace(cluster, gpus=())
    none = SweepOptions(executor=ExecutorKind.RAY, gpus=())
    assert _on_cluster(None, none, cpu_only) is cpu_only  # --gpus none: the cluster is not asked


def test_the_gpu_probe_runs_on_the_node_it_asks_in_bounded_time(ray_cluster) -> None:
    """On the real local cluster: no node has a GPU resource, so nothing is probed. The probe, a
    task of no CPU pinned to a node, answers from that node (its node id) with what nvidia-smi
    lists there. Told that the node has two GPUs (as a GPU node says), `cluster_gpus` counts two,
    sized by that answer, and where nvidia-smi listed no size (this machine) says so in a line."""
    import time

    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from harness.devices import detect_gpus
    from harness.ray_executor import _node_gpus, cluster_gpus

    assert cluster_gpus() == []
    node = dict(ray_cluster.nodes()[0])
    pinned = NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
    ran_on, listed = ray_cluster.get(ray_cluster.remote(_node_gpus).options(num_cpus=0, scheduling_strategy=pinned).remote())
    assert ran_on == node["NodeID"] and listed == [(g.index, g.name, g.memory_mib) for g in detect_gpus()]
    node["Resources"] = {**node["Resources"], "GPU": 2.0}
    notes: list[str] = []
    started = time.monotonic()
    gpus = cluster_gpus(nodes=[node], timeout_s=120, notify=notes.append)
    assert time.monotonic() - started < 60
    sizes = [m for _i, _n, m in listed if m > 0]
    assert [(g.index, g.memory_mib) for g in gpus] == [(0, min(sizes or [0])), (1, min(sizes or [0]))]
    assert node["NodeManagerAddress"] in gpus[0].name
    if not sizes:
        assert len(notes) == 1 and node["NodeManagerAddress"] in notes[0] and "did not say their memory" in notes[0]


def test_a_ray_dry_run_without_an_address_plans_for_this_machine_and_starts_no_cluster(tmp_path: Path, data_dir: Path) -> None:
    """The private cluster a sweep would start holds this machine's GPUs (none here): the dry run
    says so without starting one."""
    from click.testing import CliRunner

    from harness.cli import cli

    sweep = write_sweep(tmp_path / "s.yaml", tiny_sweep_text(seeds=1, train=300, test=100))
    env = {"RAY_ADDRESS": ""}
    result = CliRunner(env=env).invoke(cli, ["sweep", str(sweep), "--store", str(tmp_path / "h.db"), "--data-dir",
                                             str(data_dir), "--executor", "ray", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "workers: Ray actors on a local cluster, planned for CPUs" in result.output
    assert not (tmp_path / "h.db").exists()


def test_a_ray_sweep_on_a_gpu_cluster_plans_for_its_gpus(tmp_path: Path, monkeypatch) -> None:
    """Once connected, the sweep's machine is the cluster's GPUs (as `cluster_gpus` found them:
    simulated here), so `auto`'s backend and the fusion width are planned for a GPU and each
    actor is told its share; a node that did not answer gets the smallest size the others listed."""
    import harness.ray_executor
    from harness.execute import ExecutorKind, SweepOptions, _machine, _memory_share, _on_cluster
    from harness.ray_executor import node_gpus
    from harness.spec import load_sweep

    spec = load_sweep(write_sweep(tmp_path / "s.yaml", tiny_sweep_text(seeds=1, train=300, test=100)))
    options = SweepOptions(executor=ExecutorKind.RAY, runs_per_gpu=2)
    listed = [(0, "NVIDIA A100-SXM4-40GB", 40960)]
    cluster = node_gpus(2.0, listed, node="10.0.0.5") + node_gpus(1.0, None, node="10.0.0.6", first=2, unknown_mib=40960)
    assert [g.memory_mib for g in cluster] == [40960] * 3 and "size not listed" in cluster[2].name
    monkeypatch.setattr(harness.ray_executor, "cluster_gpus", lambda notify=None: cluster)
    before = _machine(spec, options)
    assert before.gpus == () and before.backend_context.device_kind == "cpu"
    after = _on_cluster(spec, options, before)
    assert len(after.gpus) == 3 and after.backend_context.device_kind == "gpu"
    assert _memory_share(after, options) == int(40960 * 2**20 * 0.9 / 2)
    monkeypatch.setattr(harness.ray_executor, "cluster_gpus", lambda notify=None: [])
    assert _on_cluster(spec, options, before) is before  # a cluster without GPUs: planned as before


def test_the_local_cluster_is_loopback_token_auth_and_no_dashboard(ray_cluster) -> None:
    ray = ray_cluster
    nodes = ray.nodes()
    assert nodes and all(n["NodeManagerAddress"] == "127.0.0.1" for n in nodes)
    assert os.environ.get("RAY_AUTH_MODE") == "token"
    from ray._raylet import AuthenticationMode, get_authentication_mode

    assert get_authentication_mode() == AuthenticationMode.TOKEN
    context = ray.get_runtime_context()
    assert not getattr(ray._private.worker.global_worker.node, "webui_url", None)  # no dashboard
    assert context.get_node_id()


def test_actors_get_the_data_from_the_object_store_not_from_files(
    ray_cluster, tmp_path: Path, data_dir: Path, monkeypatch
) -> None:
    """The workers need no data files: the driver's data folder is hidden from them."""
    log = tmp_path / "calls.jsonl"
    monkeypatch.setenv("HARNESS_FAKE_LOG", str(log))
    monkeypatch.setenv("HARNESS_DATA_DIR", str(tmp_path / "nothing-here"))  # what actors would see
    spec = load_sweep(write_sweep(tmp_path / "s.yaml", tiny_sweep_text(seeds=1, train=300, test=100)))
    outcome = execute_sweep(
        spec, SweepOptions(store=tmp_path / "h.db", data_dir=data_dir, executor="ray", train_fn="fake_train:uses_data"),
        progress=Progress((), stream=io.StringIO()),
    )
    assert outcome.trained == 2 and outcome.failed == 0
    seen = [json.loads(line) for line in log.read_text().splitlines()]
    assert all(c["n_train"] == 300 for c in seen)


def _skip_without_ray() -> None:
    import importlib.util

    if importlib.util.find_spec("ray") is None:  # not imported here: Ray reads its settings on import
        pytest.skip('Ray not installed (pip install -e ".[ray]")')


def _fake_sweep_env(log: Path, *, sleep_s: float, drop: tuple[str, ...]) -> dict[str, str]:
    """The environment of a sweep subprocess that trains with tests/fake_train.py (each call logged
    to `log`, sleeping `sleep_s`), without the variables in `drop`."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(REPO)]), "HARNESS_FAKE_LOG": str(log),
           "HARNESS_FAKE_SLEEP": str(sleep_s)}
    for key in drop:
        env.pop(key, None)
    return env


CLUSTER_SCRIPT = textwrap.dedent(
    """
    import json, os, sys, threading, time
    from pathlib import Path

    os.environ.update({"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token",
                       "RAY_AUTH_TOKEN": "test-" + os.urandom(16).hex()})
    import ray
    from ray.cluster_utils import Cluster

    from harness.execute import SweepOptions, execute_sweep
    from harness.spec import load_sweep

    def main():
        sweep, store, data_dir, log = sys.argv[1:]
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
        workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, logging_level="WARNING", log_to_driver=False)

        def remove_a_node():
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                calls = Path(log).read_text().splitlines() if Path(log).exists() else []
                if len(calls) >= 3:
                    cluster.remove_node(workers[0], allow_graceful=False)
                    print("removed", flush=True)
                    return
                time.sleep(0.05)

        threading.Thread(target=remove_a_node, daemon=True).start()
        trace = []
        outcome = execute_sweep(load_sweep(sweep), SweepOptions(store=store, data_dir=data_dir, executor="ray",
                                train_fn="fake_train:ok", retries=1, fuse=1), trace=trace)
        print("SUMMARY " + json.dumps({"trained": outcome.trained, "failed": outcome.failed, "attempts": outcome.attempts,
                          "lost": [e[2] for e in trace if e[0] == "lost"]}), flush=True)
        ray.shutdown()
        cluster.shutdown()

    if __name__ == "__main__":
        main()
    """
)


@pytest.mark.slow
def test_a_node_lost_mid_sweep_loses_no_run_and_trains_none_twice(tmp_path: Path, data_dir: Path) -> None:
    from harness.store import SQLiteStore

    _skip_without_ray()
    script = tmp_path / "cluster.py"
    script.write_text(CLUSTER_SCRIPT)
    sweep = write_sweep(tmp_path / "s.yaml", tiny_sweep_text(seeds=4, train=300, test=100))
    log = tmp_path / "calls.jsonl"
    env = _fake_sweep_env(log, sleep_s=2, drop=("RAY_ADDRESS",))
    result = subprocess.run([sys.executable, str(script), str(sweep), str(tmp_path / "h.db"), str(data_dir), str(log)],
                            env=env, capture_output=True, text=True, timeout=540)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "removed" in result.stdout
    # Ray's own log lines may follow on the same stream: the summary is the line marked as such
    summary = json.loads(next(line for line in result.stdout.splitlines() if line.startswith("SUMMARY "))[8:])
    assert summary["trained"] == 8 and summary["failed"] == 0
    assert summary["lost"] and all("died" in cause for cause in summary["lost"])
    with SQLiteStore(tmp_path / "h.db", create=False) as store:
        plan = [run_id for run_id, _v, _s in store.plan("tiny")]
        records = store.records(plan)
        assert len(records) == 8 and all(r.status.value == "done" for r in records)  # none lost
        assert store.claims() == {}
        attempts = {run_id: store.attempts(run_id) for run_id in plan}
    calls = [json.loads(line)["run_id"] for line in log.read_text().splitlines()]
    # a run is trained again only if its first attempt was on the lost node (then it is stored
    # FAILED with the cause, and retried); none is finished twice
    retried = {run_id for run_id, n in attempts.items() if n == 2}
    assert len(retried) == len(summary["lost"]) >= 1
    assert all(calls.count(run_id) == (2 if run_id in retried else 1) for run_id in plan)


# The CLI's wrapper (signals, exit codes) around `execute_sweep` on Ray with no address: the
# harness starts its own local cluster, as `harness sweep FILE --executor ray` does.
CTRL_C_SCRIPT = textwrap.dedent(
    """
    import sys
    from harness.cli import _user_errors
    from harness.execute import SweepOptions, execute_sweep
    from harness.spec import load_sweep

    @_user_errors
    def main():
        options = SweepOptions(store=sys.argv[2], data_dir=sys.argv[3], executor="ray", train_fn="fake_train:ok",
                               workers=2, fuse=1)
        execute_sweep(load_sweep(sys.argv[1]), options, notify=print)

    if __name__ == "__main__":
        main()
    """
)


def _raylets() -> set[int]:
    """Pids of the raylet processes on this machine (one per Ray node)."""
    pids = set()
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes().split(b"\0")
                state = (proc / "status").read_text()
            except OSError:
                continue
            if cmdline and cmdline[0].endswith(b"/raylet") and "State:\tZ" not in state:
                pids.add(int(proc.name))
    return pids


@pytest.mark.slow
def test_ctrl_c_on_ray_exits_130_keeps_finished_runs_and_stops_its_cluster(tmp_path: Path, data_dir: Path) -> None:
    """Ctrl-C during a Ray sweep: exit 130, no traceback, the runs finished so far stored, no
    claim left, the cluster the harness started gone; the resumed sweep trains exactly the rest."""
    import signal
    import time

    from harness.store import SQLiteStore

    _skip_without_ray()
    script = tmp_path / "sweep.py"
    script.write_text(CTRL_C_SCRIPT)
    sweep = write_sweep(tmp_path / "s.yaml", tiny_sweep_text(seeds=6, train=300, test=100))
    log = tmp_path / "calls.jsonl"
    # its own cluster, not the session's test cluster
    env = _fake_sweep_env(log, sleep_s=1, drop=("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_MODE"))
    before = _raylets()
    argv = [sys.executable, str(script), str(sweep), str(tmp_path / "h.db"), str(data_dir)]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def made() -> list[str]:
        return [json.loads(line)["run_id"] for line in log.read_text().splitlines()] if log.exists() else []

    deadline = time.monotonic() + 180
    while len(made()) < 3:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the Ray sweep did not start training in time"
        time.sleep(0.05)
    ours = _raylets() - before
    assert ours, "the sweep started no local Ray node"
    proc.send_signal(signal.SIGINT)
    _out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-8000:]
    assert "Traceback" not in err, err[-8000:]
    deadline = time.monotonic() + 30
    while _raylets() & ours and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _raylets() & ours, "the local Ray cluster outlived the interrupted sweep"
    with SQLiteStore(tmp_path / "h.db", create=False) as store:
        assert store.claims() == {}
        plan = [run_id for run_id, _v, _s in store.plan("tiny")]
        kept = {run_id for run_id, status in store.statuses(plan).items() if status.value == "done"}
    assert kept and len(kept) < len(plan)
    first = made()

    resumed = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-8000:]
    again = made()[len(first):]
    assert not set(again) & kept  # nothing finished is trained again
    assert set(again) == set(plan) - kept and len(again) == len(set(again))
    with SQLiteStore(tmp_path / "h.db", create=False) as store:
        assert all(s.value == "done" for s in store.statuses(plan).values()) and store.claims() == {}


def test_ray_slots_from_simulated_cluster_resources() -> None:
    """GPU slots ask for a share of a GPU and leave CUDA_VISIBLE_DEVICES to Ray; CPU slots get
    their threads; never more actors than pending runs. (No GPU machine here: a resource map.)"""
    from harness.ray_executor import ray_slots

    gpu = ray_slots({"CPU": 32.0, "GPU": 4.0}, pending=100, backend="tensorflow", runs_per_gpu=2)
    assert len(gpu) == 8 and {s.device for s in gpu} == {"ray:gpu"} and all(s.runs_per_gpu == 2 for s in gpu)
    assert all("CUDA_VISIBLE_DEVICES" not in s.environ() for s in gpu)
    assert all(s.environ()["KERAS_BACKEND"] == "tensorflow" for s in gpu)
    assert all("HARNESS_DEVICE_MEMORY_BYTES" not in s.environ() for s in gpu)  # no size known
    told = ray_slots({"CPU": 32.0, "GPU": 4.0}, pending=100, backend="tensorflow", runs_per_gpu=2, memory_bytes=7 * 2**30)
    assert all(s.environ()["HARNESS_DEVICE_MEMORY_BYTES"] == str(7 * 2**30) for s in told)
    from harness.ray_executor import _slot_for_backend

    assert _slot_for_backend(told[0], "jax").environ()["HARNESS_DEVICE_MEMORY_BYTES"] == str(7 * 2**30)
    assert len(ray_slots({"CPU": 32.0, "GPU": 4.0}, pending=3, backend="jax")) == 3
    cpu = ray_slots({"CPU": 8.0}, pending=100, backend="jax", threads=2)
    assert len(cpu) == 4 and all(s.threads == 2 and s.environ()["KERAS_BACKEND"] == "jax" for s in cpu)
    assert all(s.environ()["CUDA_VISIBLE_DEVICES"] == "" for s in cpu)
