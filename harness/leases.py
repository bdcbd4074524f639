"""Claims on runs in a shared store: who trains which run, and when a claim may be taken over.

Every sweep that trains a run first claims it in the store (the `claims` table: run id, owner,
expiry). A claim blocks every other sweep until it is released (with the run's record, or on
Ctrl-C / SIGTERM) or judged stale. Stale means one of two things, and nothing else:

- **the owner is provably dead**: it ran in this very PID namespace of this very boot (owner ids
  record the namespace's inode, `/proc/self/ns/pid`, and `/proc/sys/kernel/random/boot_id`) and
  its pid no longer exists. A pid probe is never trusted otherwise: a sweep in a container with
  the same host name, or on another machine, is not ours to probe;
- **its lease stopped moving**: the holder renews its lease every `lease_s / 4` while it trains; a
  claim whose expiry value this sweep has seen unchanged for `lease_s`, measured on this
  process's own monotonic clock, belongs to a sweep that stopped. Clocks of other hosts are never
  compared with ours, so a skewed clock cannot make a live claim look expired.

Taking over is a compare-and-swap in the store (`takeover=` the exact row judged stale), so two
sweeps that judge the same claim stale cannot both win it.

`claim_states` is the one-shot view for `harness status`: without time to watch a lease, it
calls a claim stale when its owner is provably dead or its expiry has passed by this machine's
clock, and says which.
"""

from __future__ import annotations

import dataclasses
import enum
import os
import socket
import threading
import time
import uuid
from typing import Callable, Iterable, Protocol

LEASE_S = 120.0  # a claim's lease; renewed every LEASE_S / 4 while its run trains


class Claim(enum.Enum):
    CLAIMED = "claimed"  # this owner may train the run now
    HELD = "held"  # another live owner is training it
    FINISHED = "finished"  # someone already stored a finished result


class ClaimStore(Protocol):
    """The part of a results store (`harness.store.ResultStore`) that claims live in."""

    def claim(
        self, run_id: str, *, owner: str, lease_s: float, takeover: tuple[str, float] | None = None
    ) -> Claim: ...

    def claim_holder(self, run_id: str) -> tuple[str, float] | None: ...

    def renew(self, run_ids: Iterable[str], *, owner: str, lease_s: float) -> None: ...

    def release(self, run_ids: Iterable[str], *, owner: str) -> None: ...

    def claims(self) -> dict[str, tuple[str, float]]: ...


class Liveness(enum.Enum):
    ALIVE = "alive"  # a process of this PID namespace and boot with that pid exists
    DEAD = "dead"  # provably gone: same namespace and boot, no such pid
    UNKNOWN = "unknown"  # another host, container or boot (or an old owner id): trust the lease


def _read(path: str) -> str:
    try:
        if path.startswith("/proc/self/ns/"):
            return os.readlink(path).strip()
        with open(path, encoding="ascii") as handle:
            return handle.read().strip()
    except OSError:
        return ""


def this_namespace() -> tuple[str, str]:
    """(PID namespace, boot id) of this process, e.g. ('pid:[4026531836]', '1b2c...'); '' where
    /proc does not say (then no pid of ours is ever probed by others, nor theirs by us)."""
    ns = _read("/proc/self/ns/pid")
    boot = _read("/proc/sys/kernel/random/boot_id")
    return ns.replace(":", "").replace("[", "").replace("]", ""), boot.replace("-", "")


@dataclasses.dataclass(frozen=True)
class Owner:
    """Who holds a claim: host (for people), pid, a random tag, and where the pid means anything."""

    host: str
    pid: int
    tag: str
    pid_ns: str = ""
    boot_id: str = ""

    def __str__(self) -> str:
        return f"{self.host}:{self.pid}:{self.tag}:{self.pid_ns}:{self.boot_id}"

    @classmethod
    def current(cls) -> "Owner":
        ns, boot = this_namespace()
        host = socket.gethostname().replace(":", "_")
        return cls(host=host, pid=os.getpid(), tag=uuid.uuid4().hex[:8], pid_ns=ns, boot_id=boot)

    @classmethod
    def parse(cls, text: str) -> "Owner | None":
        parts = text.split(":")
        if len(parts) < 3 or not parts[1].isdigit():
            return None
        ns, boot = (parts[3], parts[4]) if len(parts) >= 5 else ("", "")
        return cls(host=parts[0], pid=int(parts[1]), tag=parts[2], pid_ns=ns, boot_id=boot)


def make_owner() -> str:
    """A new claim owner id for this process (`host:pid:tag:pidns:boot`)."""
    return str(Owner.current())


def owner_liveness(owner: str, *, here: tuple[str, str] | None = None) -> Liveness:
    """Whether the owner of a claim is alive, provably dead, or not ours to probe."""
    parsed = Owner.parse(owner)
    ns, boot = here if here is not None else this_namespace()
    if parsed is None or not (parsed.pid_ns and parsed.boot_id and ns and boot):
        return Liveness.UNKNOWN
    if (parsed.pid_ns, parsed.boot_id) != (ns, boot):
        return Liveness.UNKNOWN
    try:
        os.kill(parsed.pid, 0)
    except ProcessLookupError:
        return Liveness.DEAD
    except (PermissionError, OverflowError):
        return Liveness.ALIVE
    return Liveness.ALIVE


def owner_alive(owner: str) -> bool:
    """False only when the owner is provably gone (see `owner_liveness`)."""
    return owner_liveness(owner) is not Liveness.DEAD


# --------------------------------------------------------------------------- holding claims


class LeaseKeeper:
    """The claims of one sweep: claim, watch other sweeps' leases, renew ours, release.

    `clock` is a monotonic clock (injected in tests: no sleeps needed to see a lease go stale).
    Thread-safe: a heartbeat thread may renew while the sweep's loop claims and releases.
    """

    def __init__(
        self, *, owner: str | None = None, lease_s: float = LEASE_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if not lease_s > 0:
            raise ValueError("lease_s must be positive")
        self.owner = owner or make_owner()
        self.lease_s = lease_s
        self.clock = clock
        self._held: set[str] = set()
        self._seen: dict[str, tuple[str, float, float]] = {}  # run -> (owner, expires_at, first seen)
        self._last_renew = clock()
        self._lock = threading.Lock()
        self._heartbeat: threading.Thread | None = None
        self._stop = threading.Event()

    @property
    def held(self) -> frozenset[str]:
        with self._lock:
            return frozenset(self._held)

    def claim(self, store: ClaimStore, run_id: str) -> Claim:
        """Claim `run_id` unless it is finished or another sweep's claim is still live."""
        holder = store.claim_holder(run_id)
        takeover = None
        if holder is not None and holder[0] != self.owner:
            takeover = self._stale(run_id, holder)
        result = store.claim(run_id, owner=self.owner, lease_s=self.lease_s, takeover=takeover)
        with self._lock:
            if result is Claim.CLAIMED:
                self._held.add(run_id)
                self._seen.pop(run_id, None)
            elif result is Claim.FINISHED:
                self._seen.pop(run_id, None)
        return result

    def _stale(self, run_id: str, holder: tuple[str, float]) -> tuple[str, float] | None:
        """`holder` when it may be taken over now (dead, or its lease unchanged for `lease_s`)."""
        if owner_liveness(holder[0]) is Liveness.DEAD:
            return holder
        now = self.clock()
        with self._lock:
            seen = self._seen.get(run_id)
            if seen is None or (seen[0], seen[1]) != holder:
                self._seen[run_id] = (holder[0], holder[1], now)
                return None
        return holder if now - seen[2] >= self.lease_s else None

    def done(self, run_ids: Iterable[str]) -> None:
        """These runs' records are stored (the store dropped their claims with them)."""
        with self._lock:
            self._held.difference_update(run_ids)

    def release(self, store: ClaimStore, run_ids: Iterable[str]) -> None:
        ids = list(run_ids)
        with self._lock:
            self._held.difference_update(ids)
        store.release(ids, owner=self.owner)

    def release_all(self, store: ClaimStore) -> None:
        self.stop_heartbeat()
        self.release(store, self.held)

    def renew_due(self) -> bool:
        return self.clock() - self._last_renew >= self.lease_s / 4

    def renew(self, store: ClaimStore, *, force: bool = False) -> None:
        """Push our leases forward when a quarter of the lease has passed (or `force`)."""
        with self._lock:
            if not force and self.clock() - self._last_renew < self.lease_s / 4:
                return
            self._last_renew = self.clock()
            held = list(self._held)
        store.renew(held, owner=self.owner, lease_s=self.lease_s)

    def start_heartbeat(self, open_store: Callable[[], ClaimStore]) -> None:
        """Renew from a thread with its own store connection, so a run trained in this very
        process (`--in-process`) or a long blocking call keeps its claim."""
        if self._heartbeat is not None:
            return
        self._stop.clear()

        def beat() -> None:
            try:
                store = open_store()
            except Exception:  # noqa: BLE001 - the loop's own renewals still run
                return
            try:
                while not self._stop.wait(self.lease_s / 8):
                    try:
                        self.renew(store)
                    except Exception:  # noqa: BLE001 - a busy store: try again next beat
                        pass
            finally:
                close = getattr(store, "close", None)
                if close is not None:
                    close()

        self._heartbeat = threading.Thread(target=beat, name="harness-lease-heartbeat", daemon=True)
        self._heartbeat.start()

    def stop_heartbeat(self) -> None:
        if self._heartbeat is not None:
            self._stop.set()
            self._heartbeat.join(timeout=10)
            self._heartbeat = None


# --------------------------------------------------------------------------- status


class ClaimState(enum.Enum):
    LIVE = "live"
    STALE = "stale"


@dataclasses.dataclass(frozen=True)
class ClaimInfo:
    run_id: str
    owner: str
    expires_at: float  # by the owner's clock
    state: ClaimState
    reason: str  # why stale, or how long the lease has left

    @property
    def is_live(self) -> bool:
        return self.state is ClaimState.LIVE


def claim_states(store: ClaimStore, *, now: float | None = None) -> list[ClaimInfo]:
    """Every claim in the store, judged at one glance (see the module docstring)."""
    now = time.time() if now is None else now
    here = this_namespace()
    infos = []
    for run_id, (owner, expires_at) in sorted(store.claims().items()):
        liveness = owner_liveness(owner, here=here)
        if liveness is Liveness.DEAD:
            state, reason = ClaimState.STALE, "owner process is gone"
        elif expires_at <= now:
            state, reason = ClaimState.STALE, f"lease expired {now - expires_at:.0f} s ago (this machine's clock)"
        else:
            state, reason = ClaimState.LIVE, f"lease ends in {expires_at - now:.0f} s"
        infos.append(ClaimInfo(run_id, owner, expires_at, state, reason))
    return infos
