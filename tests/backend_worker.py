"""A real training process per Keras backend for tests (the pytest process itself can run Keras on
one backend only). Its environment is `harness.backends.worker_env`, as a sweep worker's."""

from __future__ import annotations

import multiprocessing
import os
from typing import Any

from harness.records import RunRecord


def _serve(conn, env: dict[str, str]) -> None:
    os.environ.update(env)
    from harness import train
    from harness.data import load_dataset

    train.warm_up()
    while True:
        message = conn.recv()
        if message is None:
            return
        run, ref, subset, data_dir, settings = message
        dataset = load_dataset(ref, subset=subset, data_dir=data_dir)
        from harness import fused

        settings = dict(settings)
        environ = settings.pop("environ", {})  # the worker's environment, for this call only
        collect = settings.pop("reports", False)  # send back the progress reported, as a worker's sink gets it
        saved_environ = {name: os.environ.get(name) for name in environ}
        os.environ.update(environ)
        saved = {name: getattr(fused, name) for name in settings}
        for name, value in settings.items():  # module constants of harness.fused, for this call only
            setattr(fused, name, value)
        try:
            if isinstance(run, list) and collect:
                from harness import heartbeat

                reports: list[float] = []
                with heartbeat.reporting(reports.append):
                    records = fused.train_group(run, dataset)
                conn.send({"records": [record.to_json() for record in records], "reports": reports})
            elif isinstance(run, list):  # a group of runs of one variant: fused training
                conn.send([record.to_json() for record in fused.train_group(run, dataset)])
            else:
                conn.send(train.train_run(run, dataset).to_json())
        finally:
            for name, value in saved.items():
                setattr(fused, name, value)
            for name, value in saved_environ.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


class BackendTrainer:
    def __init__(self, backend: str, *, threads: int = 1) -> None:
        from harness.backends import worker_env

        env = dict(worker_env(backend, threads=threads))
        env["TF_CPP_MIN_LOG_LEVEL"] = "2"
        context = multiprocessing.get_context("spawn")
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_serve, args=(child, env), daemon=True)
        self.process.start()
        child.close()

    def train(self, run: Any, prepared: Any) -> RunRecord:
        self.conn.send((run, prepared.spec.dataset, prepared.spec.subset, prepared.data_dir, {}))
        return RunRecord.from_json(self.conn.recv())

    def train_group(self, runs: list, prepared: Any, settings: dict[str, Any] | None = None) -> list[RunRecord]:
        """Train a group fused; `settings`: constants of `harness.fused` set for this call only
        (and under "environ", variables of the worker's environment)."""
        self.conn.send((list(runs), prepared.spec.dataset, prepared.spec.subset, prepared.data_dir, settings or {}))
        return [RunRecord.from_json(text) for text in self.conn.recv()]

    def train_group_reporting(self, runs: list, prepared: Any) -> tuple[list[RunRecord], list[float]]:
        """Train a group fused, with a progress sink as a sweep's worker has: its records and the
        fractions reported, in the order the sink received them."""
        self.conn.send((list(runs), prepared.spec.dataset, prepared.spec.subset, prepared.data_dir, {"reports": True}))
        answer = self.conn.recv()
        return [RunRecord.from_json(text) for text in answer["records"]], answer["reports"]

    def close(self) -> None:
        try:
            self.conn.send(None)
        except OSError:
            pass
        self.process.join(timeout=10)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(timeout=5)
