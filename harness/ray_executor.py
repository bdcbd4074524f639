"""The Ray executor: long-lived Ray actors, one per slot, on a cluster of machines.

`harness sweep FILE --executor ray [--address ADDR]` (`RAY_ADDRESS` honoured). Ray is imported
only in this module, and only when a sweep asks for it (`pip install -e ".[ray]"`).

- One actor per slot: a GPU slot asks for `num_gpus = 1 / runs_per_gpu` (Ray sets
  `CUDA_VISIBLE_DEVICES`; memory growth / sharing comes from the backend's worker env, set before
  any Keras op), a CPU slot for `num_cpus = threads`. Each actor's environment is its slot's
  (`KERAS_BACKEND` among it) plus the driver's `HARNESS_*` settings, given as the actor's
  `runtime_env`, so Keras is imported with the
  right backend once per actor and the data prepared once per actor.
- The dataset goes to the object store once (`ray.put`): worker nodes need no data files and no
  shared filesystem. What travels to the cluster: the run's code (the harness package and the
  train function, imported by path; a builder model's module) and config, and the dataset. What
  comes back: run records (JSON). Only the driver writes the store.
- Progress (the fraction of a group's epochs trained, for the ETA) goes from the actors to a
  `ProgressBoard` actor (no CPU, on the driver's node) without waiting; the driver keeps one
  `take` on it among the refs it waits on.
- Records stream back as each group finishes (`ray.wait`). A group whose actor or node dies is
  reported as `GroupLost` and the actor replaced (Ray places it on a node that is alive); the
  sweep routine retries or records the runs FAILED with the cause: never lost, never duplicated.

Security: a Ray cluster runs any code its clients send. A local cluster started here is bound to
127.0.0.1, runs no dashboard and has token authentication on (a fresh random token in this
process's environment unless `RAY_AUTH_TOKEN` / `RAY_AUTH_TOKEN_PATH` name one). Connecting to a
cluster (`--address`), Ray reads the token from `RAY_AUTH_TOKEN` / `RAY_AUTH_TOKEN_PATH` /
`~/.ray/auth_token` itself; the harness never logs, prints or stores it, and opens no port.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import sys
import time
from typing import Any, Callable, Sequence

from harness.devices import Gpu, WorkerSlot
from harness.errors import UserError, WorkerStartError
from harness.executor import (
    ExecutorEvent,
    GroupProgress,
    GroupStarted,
    RecordsReturned,
    SlotPool,
    Trainer,
    WorkGroup,
    train_reporting,
)
from harness.records import RunRecord

LOCAL_ONLY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}  # Ray's switch for a loopback-only node


def import_ray():
    """Ray, or a one-line `UserError` saying how to install it."""
    try:
        import ray
    except ImportError:
        raise UserError(
            "--executor ray needs Ray, which is not installed here: pip install -e \".[ray]\"", key="--executor"
        ) from None
    return ray


def start_local_cluster(*, num_cpus: int | None = None, num_gpus: int | None = None, **kwargs: Any) -> None:
    """A Ray cluster on this machine only: loopback addresses, no dashboard, token auth on.

    Call before anything else imported Ray in this process (the loopback switch is read when Ray
    is imported)."""
    for key, value in LOCAL_ONLY_ENV.items():
        os.environ.setdefault(key, value)
    os.environ["RAY_AUTH_MODE"] = "token"
    if not (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")):
        # a fresh token for this cluster only, inherited by the processes it starts; never written out
        os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    already = "ray._raylet" in sys.modules
    ray = import_ray()
    if already:  # Ray read its settings when it was imported: make it see token mode now
        from ray._raylet import Config

        Config.initialize("")
    ray.init(
        num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False, logging_level="WARNING",
        log_to_driver=False, configure_logging=True, **kwargs,
    )


def connect(address: str | None) -> bool:
    """Connect to `address` (or `$RAY_ADDRESS`), or start a local cluster. True when this call
    started a cluster (the executor shuts it down at the end)."""
    ray = import_ray()
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is None:
        start_local_cluster()
        return True
    unreachable = _unreachable(address)
    if unreachable:  # Ray itself retries a dead address for minutes
        raise UserError(f"cannot connect to the Ray cluster at {address!r}: {unreachable}", key="--address")
    try:
        ray.init(address=address, logging_level="WARNING", log_to_driver=False)
    except Exception as exc:  # noqa: BLE001 - ConnectionError, auth errors, bad address...
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"cannot connect to the Ray cluster at {address!r}: {first[:300]}", key="--address") from None
    return False


CONNECT_CHECK_S = 10.0  # how long a cluster's host:port may take to accept a TCP connection


def _unreachable(address: str, *, timeout_s: float = CONNECT_CHECK_S) -> str | None:
    """Why nothing answers at `address` ("host:port", or "ray://host:port"), or None: it accepts a
    TCP connection within `timeout_s`, or it is not of that form ("auto": Ray finds the cluster)."""
    import socket

    target = address.split("://", 1)[-1].rstrip("/")
    host, _, port = target.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit():
        return None
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as exc:
        return f"nothing answers at {host}:{port} within {timeout_s:.0f} s ({exc.strerror or type(exc).__name__})"
    return None


def forwarded_env() -> dict[str, str]:
    """The driver's harness settings (`HARNESS_*`) travel to the actors, as to pool workers."""
    return {k: v for k, v in os.environ.items() if k.startswith("HARNESS_")}


def disconnect() -> None:
    """Stop the local cluster `connect` started (idempotent)."""
    if "ray" in sys.modules:
        ray = sys.modules["ray"]
        if ray.is_initialized():
            ray.shutdown()


# How long the driver waits for the GPU nodes to say what GPUs they have (`cluster_gpus`); a node
# silent longer is sized as a node without nvidia-smi is: the smallest size the others listed.
GPU_PROBE_TIMEOUT_S = 60.0


def _node_gpus() -> tuple[str, list[tuple[int, str, int]]]:
    """On a cluster node: its Ray node id and its GPUs as nvidia-smi lists them (index, name, MiB)."""
    import ray

    from harness.devices import detect_gpus

    return ray.get_runtime_context().get_node_id(), [(g.index, g.name, g.memory_mib) for g in detect_gpus()]


def node_gpus(
    count: float, listed: Sequence[tuple[int, str, int]] | None, *, node: str, first: int = 0, unknown_mib: int = 0
) -> list[Gpu]:
    """The `count` GPUs Ray schedules on one node (its "GPU" resource), each sized as the smallest
    GPU nvidia-smi `listed` there with a size: Ray may be told to use some of a node's GPUs, and
    which ones it hands an actor is its choice. Where the node listed no size (no nvidia-smi, no
    answer, GPUs that are not NVIDIA's), `unknown_mib` (0: unknown). Numbered from `first`."""
    sized = [g for g in (listed or ()) if int(g[2]) > 0]
    if sized:
        smallest = min(sized, key=lambda g: int(g[2]))
        name, memory = f"{smallest[1]} on {node}", int(smallest[2])
    else:
        name, memory = f"GPU on {node} (size not listed)", int(unknown_mib)
    return [Gpu(index=first + i, name=name, memory_mib=memory) for i in range(int(count))]


def gpu_nodes(nodes: Sequence[dict]) -> list[dict]:
    """The live nodes of `ray.nodes()` with at least one whole GPU."""
    return [n for n in nodes if n.get("Alive") and float((n.get("Resources") or {}).get("GPU", 0)) >= 1]


def usable_resources(resources: dict[str, float], gpus: tuple[int, ...] | None) -> dict[str, float]:
    """`ray.cluster_resources()` as a sweep may use them: without its GPUs for `--gpus none`."""
    return {k: v for k, v in resources.items() if not (gpus == () and k == "GPU")}


def cluster_gpus(
    *, timeout_s: float = GPU_PROBE_TIMEOUT_S, nodes: Sequence[dict] | None = None,
    notify: Callable[[str], None] | None = None,
) -> list[Gpu]:
    """The GPUs of the connected Ray cluster: for each of its `gpu_nodes` (or `nodes`), as many as
    Ray counts there, sized by what nvidia-smi lists on that node (a task of no CPU and no GPU
    pinned to the node, so it runs even when every GPU is busy; its answer must come from that
    node). A node that does not answer within `timeout_s`, lists no size or cannot run the probe
    gets the smallest size the others listed (none listed: unknown, as for a local GPU of unknown
    size), and `notify` hears which. No GPU resource anywhere: no task, an empty list."""
    ray = import_ray()
    if nodes is None:
        try:
            nodes = gpu_nodes(ray.nodes())
        except Exception:  # noqa: BLE001 - a client that cannot list nodes: Ray's count, sizes unknown
            nodes = None
    if nodes is None:
        try:
            count = ray.cluster_resources().get("GPU", 0)
        except Exception:  # noqa: BLE001 - nor its resources: planned as before, on CPUs
            return []
        if count >= 1 and notify is not None:
            notify(f"Ray: the cluster's nodes could not be listed; its {int(count)} GPUs are planned with an unknown memory size")
        return node_gpus(count, None, node="the cluster")
    nodes = list(nodes)
    if not nodes:
        return []
    answers: dict[str, list] = {}
    try:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        probe = ray.remote(_node_gpus)
        refs = {
            n["NodeID"]: probe.options(
                num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
            ).remote()
            for n in nodes
        }
        ready, waiting = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
        for node_id, ref in refs.items():
            if ref not in ready:
                continue
            try:
                ran_on, listed = ray.get(ref)
            except Exception:  # noqa: BLE001 - a node that cannot run the probe: sizes unknown
                continue
            if ran_on == node_id:
                answers[node_id] = [g for g in listed if int(g[2]) > 0]
        for ref in waiting:
            try:
                ray.cancel(ref)
            except Exception:  # noqa: BLE001 - finished or gone meanwhile
                pass
    except Exception:  # noqa: BLE001 - the probe could not be sent (a client's limits): sizes unknown
        answers = {}
    known = [int(g[2]) for listed in answers.values() for g in listed]
    fallback = min(known) if known else 0
    gpus: list[Gpu] = []
    silent = []
    for node in nodes:
        address = str(node.get("NodeManagerAddress") or node["NodeID"][:8])
        if not answers.get(node["NodeID"]):
            silent.append(address)
        gpus += node_gpus(node["Resources"]["GPU"], answers.get(node["NodeID"]), node=address, first=len(gpus),
                          unknown_mib=fallback)
    if silent and notify is not None:
        planned = f"planned with the smallest size the others listed, {fallback:,} MiB" if fallback else (
            "planned as GPUs of unknown size (fusion up to its GPU cap)")
        notify(f"Ray: the GPUs of {', '.join(silent)} did not say their memory (nvidia-smi, within "
               f"{timeout_s:.0f} s); {planned}")
    return gpus


def ray_slots(
    resources: dict[str, float],
    *,
    pending: int,
    backend: str,
    runs_per_gpu: int = 1,
    workers: int | None = None,
    threads: int | None = None,
    deterministic: bool = False,
    memory_bytes: int | None = None,
) -> list[WorkerSlot]:
    """Actors for a cluster with `resources` (`ray.cluster_resources()`): with GPUs, runs_per_gpu
    actors per GPU, each told `memory_bytes` (the GPU memory share the fusion width was planned
    with, when known); otherwise one actor per `threads` CPUs. Never more actors than pending runs."""
    from harness.backends import worker_env

    gpus = int(resources.get("GPU", 0))
    threads = threads or 1
    pending = max(1, pending)
    if gpus:
        count = min(workers or gpus * runs_per_gpu, pending)
        env = tuple(
            (k, v) for k, v in worker_env(backend, threads=threads, gpu=0, runs_per_gpu=runs_per_gpu,
                                          deterministic=deterministic, memory_bytes=memory_bytes)
            if k != "CUDA_VISIBLE_DEVICES"  # Ray sets it for each actor
        )
        return [WorkerSlot(f"ray-gpu.{i}", "ray:gpu", threads, env, backend, runs_per_gpu, deterministic,
                           memory_bytes=memory_bytes) for i in range(count)]
    cpus = int(resources.get("CPU", 1))
    count = min(workers or max(1, cpus // threads), pending)
    env = worker_env(backend, threads=threads, deterministic=deterministic)
    return [WorkerSlot(f"ray-cpu.{i}", "ray:cpu", threads, env, backend, 1, deterministic) for i in range(count)]


def _slot_for_backend(slot: WorkerSlot, backend: str) -> WorkerSlot:
    from harness.backends import worker_env

    gpu = 0 if slot.device == "ray:gpu" else None
    env = tuple(
        (k, v) for k, v in worker_env(backend, threads=slot.threads, gpu=gpu, runs_per_gpu=slot.runs_per_gpu,
                                      deterministic=slot.deterministic, memory_bytes=slot.memory_bytes)
        if not (gpu is not None and k == "CUDA_VISIBLE_DEVICES")
    )
    return dataclasses.replace(slot, backend=backend, env=env)


class ProgressBoard:
    """An async Ray actor (no CPU) on the driver's node that collects the groups' progress
    (`harness.heartbeat`): the harness actors post to it without waiting, and the driver keeps
    one `take` outstanding among the refs it waits on, answered as soon as something arrived."""

    def __init__(self) -> None:
        self.items: list[GroupProgress] = []
        self.arrived: Any = None

    def _arrived(self) -> Any:
        import asyncio

        if self.arrived is None:
            self.arrived = asyncio.Event()
        return self.arrived

    async def post(self, progress: GroupProgress) -> None:
        self.items.append(progress)
        self._arrived().set()

    async def take(self) -> list[GroupProgress]:
        await self._arrived().wait()
        items, self.items = self.items, []
        self._arrived().clear()
        return items


class RayTrainer:
    """The body of a harness actor (wrapped with `ray.remote` by the executor)."""

    def __init__(self, trainer: Trainer, dataset: Any, board: Any = None) -> None:
        import signal

        for signum in (signal.SIGINT,):
            signal.signal(signum, signal.SIG_IGN)  # Ctrl-C is the driver's to handle
        self.train = trainer.load()
        trainer.warm_up()  # Keras imported here, once, with this actor's KERAS_BACKEND
        self.dataset = dataset  # resolved from the object store once
        self.board = board
        self.last_post: Any = None

    def ready(self) -> tuple[int, str]:
        import ray

        return os.getpid(), ray.get_runtime_context().get_node_id()

    def _post(self, progress: GroupProgress) -> None:
        """To the board, without waiting for it; a board found dead (its last post failed) is
        given up on, so no post fails unread every second."""
        if self.board is None:
            return
        if self.last_post is not None:
            import ray

            ready, _ = ray.wait([self.last_post], timeout=0)
            if ready:
                try:
                    ray.get(ready[0])
                except Exception:  # noqa: BLE001 - the board is gone: progress is advice
                    self.board = None
                    return
        self.last_post = self.board.post.remote(progress)

    def train_group(self, group_id: int, runs: tuple) -> list[str]:
        records = train_reporting(group_id, runs, lambda: self.train(runs, self.dataset), self._post)
        return [record.to_json() for record in records]


@dataclasses.dataclass
class _Actor:
    slot: WorkerSlot
    handle: Any
    ready_ref: Any
    started_at: float
    ready: bool = False
    node: str = ""
    group: WorkGroup | None = None
    task: Any = None
    sent_at: float = 0.0
    assigned: WorkGroup | None = None


@dataclasses.dataclass
class RayStats:
    actor_starts: int = 0
    warm_up_s: list[float] = dataclasses.field(default_factory=list)
    return_s: list[float] = dataclasses.field(default_factory=list)

    def overhead_per_run_s(self) -> float:
        return sum(self.return_s) / len(self.return_s) if self.return_s else 0.0

    def describe(self) -> str:
        warm = sum(self.warm_up_s) / len(self.warm_up_s) if self.warm_up_s else 0.0
        return (
            f"ray: {self.actor_starts} actor starts, warm-up mean {warm:.1f} s, "
            f"scheduler overhead per run: mean {self.overhead_per_run_s():.3f} s"
        )


class RayExecutor(SlotPool):
    """Ray actors, one per `WorkerSlot`; see the module docstring."""

    def __init__(
        self,
        slots: Sequence[WorkerSlot],
        *,
        dataset: Any,
        trainer: Trainer = Trainer(),
        owns_cluster: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not slots:
            raise ValueError("a Ray executor needs at least one slot")
        self.ray = import_ray()
        self.slots = list(slots)
        self.trainer = trainer
        self.owns_cluster = owns_cluster
        self.clock = clock
        self.stats = RayStats()
        self._dataset = dataset
        self._dataset_ref = None
        self._actor_class = None
        self._members: list[_Actor] = []
        self._events: list[ExecutorEvent] = []
        self._board: Any = None  # the ProgressBoard actor, and the `take` outstanding on it
        self._board_ref: Any = None

    @classmethod
    def for_cluster(
        cls, *, spec, options, backend: str, pending: int, dataset, owns_cluster: bool, memory_bytes: int | None = None
    ) -> "RayExecutor":
        """Actors sized to the connected cluster (`connect` first; its GPUs unless `--gpus none`);
        GPU actors are told `memory_bytes`, the share of GPU memory the fusion width was planned
        with (`cluster_gpus`)."""
        ray = import_ray()
        slots = ray_slots(
            usable_resources(ray.cluster_resources(), options.gpus), pending=pending, backend=backend, runs_per_gpu=options.runs_per_gpu,
            workers=options.workers, threads=options.threads, deterministic=spec.deterministic,
            memory_bytes=memory_bytes,
        )
        return cls(slots, dataset=dataset, trainer=options.trainer, owns_cluster=owns_cluster)

    # ------------------------------------------------------------------ actors

    def describe(self) -> str:
        kinds = ", ".join(f"{s.name} ({s.backend})" for s in self.slots)
        return f"workers: {len(self.slots)} Ray actors: {kinds}"

    def start(self) -> None:
        if self._members:
            return
        self._dataset_ref = self.ray.put(self._dataset)  # once: every actor reads the same copy
        self._actor_class = self.ray.remote(RayTrainer)
        self._start_board()
        self._members = [self._start(slot) for slot in self.slots]

    def _start_board(self) -> None:
        """The progress board; without one (a client that cannot place it) the sweep still runs,
        its ETA from finished runs alone."""
        try:
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            here = NodeAffinitySchedulingStrategy(self.ray.get_runtime_context().get_node_id(), soft=True)
            self._board = self.ray.remote(ProgressBoard).options(num_cpus=0, scheduling_strategy=here).remote()
            self._board_ref = self._board.take.remote()
        except Exception:  # noqa: BLE001 - progress is advice
            self._board = self._board_ref = None

    def _start(self, slot: WorkerSlot) -> _Actor:
        resources: dict[str, Any] = {"num_cpus": slot.threads}
        if slot.device == "ray:gpu":
            resources["num_gpus"] = 1 / max(1, slot.runs_per_gpu)
        env = {**forwarded_env(), **slot.environ()}
        handle = self._actor_class.options(  # type: ignore[union-attr]
            runtime_env={"env_vars": env}, max_restarts=0, max_task_retries=0, **resources
        ).remote(self.trainer, self._dataset_ref, self._board)
        self.stats.actor_starts += 1
        return _Actor(slot=slot, handle=handle, ready_ref=handle.ready.remote(), started_at=self.clock())

    def _slot_for(self, slot: WorkerSlot, backend: str) -> WorkerSlot:
        return _slot_for_backend(slot, backend)

    def _kill(self, actor: _Actor) -> None:
        try:
            self.ray.kill(actor.handle, no_restart=True)
        except Exception:  # noqa: BLE001 - already dead
            pass

    def shutdown(self) -> None:
        """Kill every actor (those training are cancelled: nothing of theirs is kept)."""
        for actor in self._members:
            self._kill(actor)
        self._members = []
        if self._board is not None:
            try:
                self.ray.kill(self._board, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass
            self._board = self._board_ref = None
        if self.owns_cluster and self.ray.is_initialized():
            self.ray.shutdown()
            self.owns_cluster = False

    # ------------------------------------------------------------------ work

    def _send(self, actor: _Actor, group: WorkGroup) -> None:
        actor.group, actor.assigned, actor.sent_at = group, None, self.clock()
        actor.task = actor.handle.train_group.remote(group.group_id, group.runs)
        self._events.append(GroupStarted(group.group_id, actor.slot.name, f"ray:{actor.node[:12]}"))

    def poll(self, timeout_s: float) -> list[ExecutorEvent]:
        if not self._events:
            refs: dict[Any, _Actor | None] = {a.ready_ref: a for a in self._members if not a.ready}
            refs.update({a.task: a for a in self._members if a.task is not None})
            if refs and self._board_ref is not None:
                refs[self._board_ref] = None
            if refs:
                done, _ = self.ray.wait(list(refs), num_returns=1, timeout=timeout_s)
                if done:
                    done, _ = self.ray.wait(list(refs), num_returns=len(refs), timeout=0)
                for ref in done:
                    actor = refs[ref]
                    if actor is None:
                        self._progressed(ref)
                    elif actor in self._members:
                        self._finished(actor, ref)
            else:
                time.sleep(timeout_s)
        events, self._events = self._events, []
        return events

    def _finished(self, actor: _Actor, ref: Any) -> None:
        if ref is actor.ready_ref and not actor.ready:
            try:
                _pid, actor.node = self.ray.get(ref)
            except self.ray.exceptions.RayError as exc:
                self._died_starting(actor, exc)
                return
            actor.ready = True
            self.stats.warm_up_s.append(self.clock() - actor.started_at)
            if actor.assigned is not None:
                self._send(actor, actor.assigned)
            return
        group = actor.group
        if group is None:
            return
        try:
            texts = self.ray.get(ref)
        except self.ray.exceptions.RayError as exc:
            self._lost(actor, f"Ray actor {actor.slot.name} on node {actor.node[:12]} died while training this run: "
                              f"{_first_line(exc)}")
            return
        actor.group, actor.task = None, None
        records = tuple(RunRecord.from_json(text) for text in texts)
        inside = sum(r.timings.get("wall_s", 0.0) for r in records)
        self.stats.return_s.append(max(0.0, self.clock() - actor.sent_at - inside))
        self._events.append(RecordsReturned(group.group_id, records))

    def _progressed(self, ref: Any) -> None:
        """The board answered: progress of the groups still training (a stale one is dropped);
        ask again. Progress is advice: a board that died (its node gone) is given up on."""
        try:
            items = self.ray.get(ref)
        except self.ray.exceptions.RayError:
            self._board_ref = None
            return
        training = {a.group.group_id for a in self._members if a.group is not None}
        self._events.extend(item for item in items if item.group_id in training)  # in order; each timed
        self._board_ref = self._board.take.remote()

    def _died_starting(self, actor: _Actor, exc: Exception) -> None:
        text = str(exc)
        if "creation task" in text or "__init__" in text:
            raise WorkerStartError(
                f"Ray actor {actor.slot.name} ({actor.slot.backend}) could not start: {_first_line(exc)}",
                key=self.trainer.group or self.trainer.run,
            )
        self._lost(actor, None)  # its node went away before it was ready: start it elsewhere

    def summary(self) -> str | None:
        return self.stats.describe() if self.stats.return_s else None


def _first_line(exc: BaseException) -> str:
    for line in str(exc).strip().splitlines():
        if line.strip():
            return line.strip()[:300]
    return type(exc).__name__
