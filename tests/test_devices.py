"""Device detection and pinning with a simulated device list (CI has no GPU)."""

from __future__ import annotations

import dataclasses
import subprocess

import pytest

from harness.devices import CPUS_ENV, Gpu, detect_gpus, parse_gpu_list, parse_nvidia_smi, pin_slots, pin_to_cpus, plan_workers
from harness.errors import UserError

SMI = "0, NVIDIA H100 80GB HBM3, 81559\n1, NVIDIA H100 80GB HBM3, 81559\n"
TWO_GPUS = parse_nvidia_smi(SMI)


def test_parse_nvidia_smi() -> None:
    assert TWO_GPUS == [Gpu(0, "NVIDIA H100 80GB HBM3", 81559), Gpu(1, "NVIDIA H100 80GB HBM3", 81559)]
    assert parse_nvidia_smi("") == []


def test_detect_gpus_uses_nvidia_smi_and_survives_its_absence() -> None:
    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, stdout=SMI, stderr="")

    assert detect_gpus(run=fake_run) == TWO_GPUS
    assert calls[0][0] == "nvidia-smi"

    def missing(cmd, **kwargs):
        raise FileNotFoundError("nvidia-smi")

    assert detect_gpus(run=missing) == []
    assert detect_gpus(run=lambda cmd, **kw: subprocess.CompletedProcess(cmd, 9, "", "NVIDIA-SMI has failed")) == []


def test_several_runs_per_gpu_each_pinned() -> None:
    slots = plan_workers(gpus=TWO_GPUS, pending=100, cpu_count=16, runs_per_gpu=3)
    assert len(slots) == 6
    pinned = [s.environ()["CUDA_VISIBLE_DEVICES"] for s in slots]
    assert sorted(pinned) == ["0", "0", "0", "1", "1", "1"]
    assert pinned[:2] == ["0", "1"]  # spread over GPUs first
    assert all(s.environ()["TF_FORCE_GPU_ALLOW_GROWTH"] == "true" for s in slots)
    assert all(s.threads == 16 // 6 for s in slots)
    assert {s.device for s in slots} == {"gpu:0", "gpu:1"}


def test_gpu_selection_and_errors() -> None:
    slots = plan_workers(gpus=TWO_GPUS, pending=10, cpu_count=8, use_gpus=parse_gpu_list("1"), runs_per_gpu=2)
    assert [s.environ()["CUDA_VISIBLE_DEVICES"] for s in slots] == ["1", "1"]
    with pytest.raises(UserError, match="GPU 4 not found"):
        plan_workers(gpus=TWO_GPUS, pending=10, cpu_count=8, use_gpus=[4])
    with pytest.raises(UserError, match="--gpus"):
        parse_gpu_list("0,x")
    assert parse_gpu_list("none") == []


def test_no_more_workers_than_runs() -> None:
    assert len(plan_workers(gpus=TWO_GPUS, pending=1, cpu_count=8, runs_per_gpu=4)) == 2  # one per GPU at least
    assert len(plan_workers(gpus=[], pending=1, cpu_count=8)) == 1


def test_cpu_packing_single_thread_workers() -> None:
    slots = plan_workers(gpus=[], pending=12, cpu_count=2)
    assert [(s.device, s.threads) for s in slots] == [("cpu", 1), ("cpu", 1)]
    env = slots[0].environ()
    assert env["CUDA_VISIBLE_DEVICES"] == "" and env["TF_NUM_INTRAOP_THREADS"] == "1" and env["OMP_NUM_THREADS"] == "1"


def test_cpu_spare_cores_become_threads() -> None:
    slots = plan_workers(gpus=[], pending=3, cpu_count=16)
    assert [s.threads for s in slots] == [5, 5, 5]


def test_cpu_workers_capped_by_memory_and_overrides() -> None:
    assert len(plan_workers(gpus=[], pending=64, cpu_count=32, memory_gib=9.0)) == 4
    slots = plan_workers(gpus=[], pending=64, cpu_count=32, workers=3, threads=2, memory_gib=1.0)
    assert [(s.name, s.threads) for s in slots] == [("cpu.0", 2), ("cpu.1", 2), ("cpu.2", 2)]
    with pytest.raises(UserError, match="--workers"):
        plan_workers(gpus=[], pending=4, cpu_count=2, workers=0)


def test_cpu_workers_are_pinned_only_when_they_share_out_every_core() -> None:
    """Pinned when the workers' threads add up to this process's cores (each its own); otherwise
    not pinned at all, so pinning never leaves a core idle or books one twice."""
    slots = plan_workers(gpus=[], pending=12, cpu_count=4, cpus=[2, 3, 5, 7], backend="jax")
    assert [s.cpus for s in slots] == [(2,), (3,), (5,), (7,)]
    assert slots[1].environ()[CPUS_ENV] == "3"
    slots = plan_workers(gpus=[], pending=2, cpu_count=4, cpus=[0, 1, 2, 3])  # 2 workers x 2 threads
    assert [(s.threads, s.cpus) for s in slots] == [(2, (0, 1)), (2, (2, 3))]
    assert slots[0].for_backend("jax").cpus == (0, 1)  # a worker restarted on another backend keeps its cores
    # pinned only with a JAX worker among them (XLA ignores the thread setting; TensorFlow lost
    # about 6% pinned on its own)
    assert pin_slots(slots) == [dataclasses.replace(s, cpus=()) for s in slots]
    mixed = [slots[0].for_backend("jax"), slots[1]]
    assert pin_slots(mixed) == mixed and mixed[1].environ()[CPUS_ENV] == "2,3"
    for slots in (
        plan_workers(gpus=[], pending=1, cpu_count=4, cpus=[0, 1, 2, 3], workers=1, threads=1),  # fewer threads
        plan_workers(gpus=[], pending=8, cpu_count=2, cpus=[0, 1], workers=4),  # more workers than cores
        plan_workers(gpus=[], pending=8, cpu_count=2),  # cores unknown
        plan_workers(gpus=TWO_GPUS, pending=8, cpu_count=2, cpus=[0, 1]),  # GPU workers
    ):
        assert all(s.cpus == () and CPUS_ENV not in s.for_backend("jax").environ() for s in slots)


def test_pin_to_cpus_pins_this_process_or_leaves_it() -> None:
    import multiprocessing
    import os

    if not hasattr(os, "sched_getaffinity"):
        pytest.skip("no CPU affinity on this OS")
    core = sorted(os.sched_getaffinity(0))[-1]
    with multiprocessing.get_context("spawn").Pool(1, maxtasksperchild=1) as pool:  # a fresh process a call
        assert pool.apply(_pinned, (str(core),)) == ((core,), [core])
        everything = sorted(os.sched_getaffinity(0))
        assert pool.apply(_pinned, ("",)) == ((), everything)  # empty: left as it is
        assert pool.apply(_pinned, ("99999",)) == ((), everything)  # a core we may not use: unpinned


def _pinned(value: str):
    """Pin this process to `value`; what it got and the mask of a thread started before."""
    import os
    import threading

    started, done = threading.Event(), threading.Event()
    ids: list[int] = []

    def wait() -> None:
        ids.append(threading.get_native_id())
        started.set()
        done.wait()

    thread = threading.Thread(target=wait)
    thread.start()
    started.wait()
    got = pin_to_cpus(value)
    mine, earlier = sorted(os.sched_getaffinity(0)), sorted(os.sched_getaffinity(ids[0]))
    done.set()
    thread.join()
    assert earlier == mine  # a thread already running is pinned with the process
    return got, mine
