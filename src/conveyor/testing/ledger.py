"""An execution ledger kept outside the broker, and a checker that proves nothing was lost.

Use it to test your own deployment the way conveyor tests itself (reliability plan, section 7.0):
record every execution from inside the task, every acknowledged enqueue from the producer, inject
faults, let the queue drain, then :func:`check` the ledger directory.

Writing (each process appends to its own JSONL file in one directory)::

    from conveyor.testing.ledger import Ledger, Producer, check

    ledger = Ledger("/tmp/ledger")  # one per process; files are named ROLE-PID.jsonl

    @app.task(on_success="myapp.committed")
    async def work(ctx: JobContext, n: int) -> None:
        ledger.record_start(ctx.job_id, ctx.attempt)
        ...
        ledger.record_end(ctx.job_id, ctx.attempt)  # outcome "ok" by default

    @app.task(name="myapp.committed")
    def committed(outcome: dict[str, Any]) -> None:
        # on_success runs only once the broker has accepted the ack: one line per commit.
        ledger.record_committed(outcome["job_id"], outcome["attempts"])

    producer = Producer("/tmp/ledger")
    handle = await app.enqueue(work, args=[1])
    producer.acked(handle.id)  # after the broker answered; on an ambiguous error: unknown(id)

Why files and not the broker: the broker is the thing under test. Each record is one line written
with a single unbuffered ``os.write`` on an ``O_APPEND`` descriptor, so lines never interleave
and a record survives a SIGKILL of its writer the moment ``os.write`` returns (the kernel has
it). Only power loss needs fsync (``Ledger(dir, fsync=True)``).

Checking (after the faults stopped and the queue drained)::

    report = check("/tmp/ledger", broker="redis://...")  # or await acheck(dir, broker)
    assert report.ok, report.problems()

The :class:`Report` counts:

* ``lost``: acknowledged enqueues with no successful execution (and, given a broker, not in
  state ``completed`` there). Must be 0.
* ``unexpected``: executions of ids never enqueued (neither acked nor unknown). Must be 0.
* ``dup_exec``: ids with more than one started execution (expected only for jobs in flight at a
  fault).
* ``dup_commit``: ids whose completion the broker accepted more than once, i.e. with more than
  one ``committed`` record. Must be 0 (fencing).
* ``overlaps``: ids started again while an earlier execution was still running in a process
  that had not been faulted (two live owners at once). Must be 0.
* ``recovered``: unknown-outcome enqueues that did execute (informational).
* ``recovery_s``: per fault, the time from the fault until every execution it orphaned had
  started again (faults naming a ``pid``), or, for a heal record, until the first execution
  after it (consumption back); the list holds one figure per fault.
* ``hangs``: hang records (a process that did not exit within its budget).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from conveyor.brokers.base import Broker
    from conveyor.job import JobState

#: Record kinds (the ``k`` field of each JSONL line).
START, END, COMMITTED, ACKED, UNKNOWN, FAULT, HEAL, HANG = (
    "start",
    "end",
    "committed",
    "acked",
    "unknown",
    "fault",
    "heal",
    "hang",
)


class _Appender:
    """One append-only JSONL file per (directory, role, process), reopened after a fork."""

    def __init__(self, directory: str | os.PathLike[str], role: str, *, fsync: bool) -> None:
        self.dir = Path(directory)
        self.role = role
        self.fsync = fsync
        self._fd: int | None = None
        self._pid = 0

    def write(self, record: dict[str, Any]) -> None:
        pid = os.getpid()
        if self._fd is None or self._pid != pid:
            # A forked child must not share the parent's file: its pid names its own.
            self.dir.mkdir(parents=True, exist_ok=True)
            path = self.dir / f"{self.role}-{pid}.jsonl"
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            self._pid = pid
        record.setdefault("pid", pid)
        record.setdefault("t", time.time())
        # One write per line: O_APPEND makes it atomic with respect to other appenders.
        os.write(self._fd, (json.dumps(record, separators=(",", ":")) + "\n").encode())
        if self.fsync:
            os.fsync(self._fd)

    def close(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = None


class Ledger:
    """The execution side: jobs record their start, end and accepted commit.

    Args:
        directory: the ledger directory (shared by every process of a test).
        role: names this process's file (``ROLE-PID.jsonl``).
        fsync: fsync after every record (only power-loss tests need it).
    """

    def __init__(
        self, directory: str | os.PathLike[str], *, role: str = "worker", fsync: bool = False
    ) -> None:
        self._out = _Appender(directory, role, fsync=fsync)

    @property
    def directory(self) -> Path:
        """The ledger directory."""
        return self._out.dir

    def record_start(self, job_id: str, attempt: int) -> None:
        """An execution of ``job_id`` (``attempt``, 1-based) begins in this process."""
        self._out.write({"k": START, "id": job_id, "attempt": attempt})

    def record_end(self, job_id: str, attempt: int, outcome: str = "ok") -> None:
        """The execution ended: ``ok`` counts as a successful execution, anything else not."""
        self._out.write({"k": END, "id": job_id, "attempt": attempt, "outcome": outcome})

    def record_committed(self, job_id: str, attempt: int) -> None:
        """The broker accepted this execution's completion (call it from ``on_success``)."""
        self._out.write({"k": COMMITTED, "id": job_id, "attempt": attempt})

    def record_fault(self, name: str, *, pid: int | None = None, t: float | None = None) -> None:
        """A fault was injected now (``pid``: the process it hit, whose runs it orphaned)."""
        record: dict[str, Any] = {"k": FAULT, "name": name, "victim": pid}
        if t is not None:
            record["t"] = t
        self._out.write(record)

    def record_heal(self, name: str, *, t: float | None = None) -> None:
        """A fault ended now (e.g. the broker accepts connections again)."""
        record: dict[str, Any] = {"k": HEAL, "name": name}
        if t is not None:
            record["t"] = t
        self._out.write(record)

    def record_hang(self, what: str) -> None:
        """A process did not finish within its budget (the checker counts these)."""
        self._out.write({"k": HANG, "what": what})

    def close(self) -> None:
        """Close this process's file (records after this reopen it)."""
        self._out.close()


class Producer:
    """The enqueue side: record what the broker acknowledged, and what is unknown."""

    def __init__(
        self, directory: str | os.PathLike[str], *, role: str = "producer", fsync: bool = False
    ) -> None:
        self._out = _Appender(directory, role, fsync=fsync)

    def acked(self, job_id: str) -> None:
        """The broker acknowledged the enqueue of ``job_id``: it must not be lost."""
        self._out.write({"k": ACKED, "id": job_id})

    def acked_many(self, job_ids: Iterable[str]) -> None:
        """:meth:`acked` for each id (one write per id, so a crash leaves whole lines)."""
        for job_id in job_ids:
            self.acked(job_id)

    def unknown(self, job_id: str) -> None:
        """The enqueue of ``job_id`` failed ambiguously (it may or may not be stored)."""
        self._out.write({"k": UNKNOWN, "id": job_id})

    def close(self) -> None:
        """Close this process's file."""
        self._out.close()


@dataclass
class Report:
    """What :func:`check` found; :attr:`ok` holds when every must-be-zero count is zero."""

    acked: int = 0
    unknown: int = 0
    executions: int = 0
    lost: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    dup_exec: list[str] = field(default_factory=list)
    dup_commit: list[str] = field(default_factory=list)
    overlaps: list[str] = field(default_factory=list)
    recovered: list[str] = field(default_factory=list)
    recovery_s: list[float] = field(default_factory=list)
    unrecovered: int = 0
    hangs: int = 0
    broker_checked: bool = False

    @property
    def ok(self) -> bool:
        """No loss, no unexpected run, no double commit, no overlap, every orphan back, no hang."""
        return not self.problems()

    def problems(self) -> list[str]:
        """Human-readable reasons :attr:`ok` is false (empty when it is true)."""
        out = []
        for name in ("lost", "unexpected", "dup_commit", "overlaps"):
            ids: list[str] = getattr(self, name)
            if ids:
                out.append(f"{name}={len(ids)} (e.g. {', '.join(sorted(ids)[:3])})")
        if self.unrecovered:
            out.append(f"unrecovered={self.unrecovered} orphaned execution(s) never restarted")
        if self.hangs:
            out.append(f"hangs={self.hangs}")
        return out

    def as_row(self) -> dict[str, Any]:
        """Counts (not ids) for a report table or a JSON line."""
        return {
            "acked": self.acked,
            "unknown": self.unknown,
            "executions": self.executions,
            "lost": len(self.lost),
            "unexpected": len(self.unexpected),
            "dup_exec": len(self.dup_exec),
            "dup_commit": len(self.dup_commit),
            "overlaps": len(self.overlaps),
            "recovered": len(self.recovered),
            "recovery_max_s": max(self.recovery_s) if self.recovery_s else None,
            "unrecovered": self.unrecovered,
            "hangs": self.hangs,
            "broker_checked": self.broker_checked,
        }


def read_records(directory: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every record of every ``*.jsonl`` file in ``directory``, oldest first.

    A torn last line (a writer killed mid-``write`` cannot produce one, but a full disk can) is
    skipped rather than failing the whole check.
    """
    records = []
    for path in sorted(Path(directory).glob("*.jsonl")):
        for line in path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and "k" in record:
                records.append(record)
    records.sort(key=lambda r: float(r.get("t", 0.0)))
    return records


@dataclass
class _Run:
    """One execution: who ran it, when it started, and when it ended (None: never seen)."""

    pid: int
    start: float
    end: float | None = None
    ok: bool = False


def _runs(records: list[dict[str, Any]]) -> dict[str, list[_Run]]:
    runs: dict[str, list[_Run]] = defaultdict(list)
    for r in records:
        if r["k"] == START:
            runs[r["id"]].append(_Run(pid=r["pid"], start=r["t"]))
        elif r["k"] == END:
            # The earliest open run of this id in the same process.
            for run in runs.get(r["id"], []):
                if run.pid == r["pid"] and run.end is None:
                    run.end = r["t"]
                    run.ok = r.get("outcome") == "ok"
                    break
    return runs


def _recovery(
    records: list[dict[str, Any]], runs: Mapping[str, list[_Run]]
) -> tuple[list[float], int]:
    """Recovery time per fault, and the number of orphaned executions never restarted."""
    starts = sorted(r["t"] for r in records if r["k"] in (START, END))
    figures: list[float] = []
    unrecovered = 0
    for rec in records:
        t_f = rec["t"]
        if rec["k"] == HEAL:
            later = [t for t in starts if t > t_f]
            if later:
                figures.append(later[0] - t_f)
            continue
        if rec["k"] != FAULT or rec.get("victim") is None:
            continue
        worst = 0.0
        for id_runs in runs.values():
            orphaned = any(
                r.pid == rec["victim"] and r.start <= t_f and (r.end is None or r.end > t_f)
                for r in id_runs
            )
            if not orphaned:
                continue
            restarts = [r.start for r in id_runs if r.start > t_f and r.pid != rec["victim"]]
            if restarts:
                worst = max(worst, min(restarts) - t_f)
            else:
                unrecovered += 1
        figures.append(worst)
    return figures, unrecovered


def _overlaps(records: list[dict[str, Any]], runs: Mapping[str, list[_Run]]) -> list[str]:
    """Ids started while another process still ran them (a victim's runs end at its fault)."""
    fault_at: dict[int, float] = {}
    for rec in records:
        if rec["k"] == FAULT and rec.get("victim") is not None:
            fault_at.setdefault(rec["victim"], rec["t"])
    out = []
    for job_id, id_runs in runs.items():
        for i, later in enumerate(id_runs):
            for earlier in id_runs[:i]:
                if earlier.pid == later.pid:
                    continue
                until = earlier.end if earlier.end is not None else float("inf")
                until = min(until, fault_at.get(earlier.pid, float("inf")))
                if later.start < until:
                    out.append(job_id)
                    break
            else:
                continue
            break
    return out


def analyse(
    records: list[dict[str, Any]], broker_states: Mapping[str, JobState] | None = None
) -> Report:
    """Compute the :class:`Report` from ledger records (and the broker's view, if given)."""
    acked = {r["id"] for r in records if r["k"] == ACKED}
    unknown = {r["id"] for r in records if r["k"] == UNKNOWN} - acked
    runs = _runs(records)
    succeeded = {job_id for job_id, rs in runs.items() if any(r.ok for r in rs)}
    commits = Counter(r["id"] for r in records if r["k"] == COMMITTED)
    report = Report(
        acked=len(acked),
        unknown=len(unknown),
        executions=sum(len(rs) for rs in runs.values()),
        unexpected=sorted(set(runs) - acked - unknown),
        dup_exec=sorted(job_id for job_id, rs in runs.items() if len(rs) > 1),
        dup_commit=sorted(job_id for job_id, n in commits.items() if n > 1),
        recovered=sorted(unknown & set(runs)),
        hangs=sum(1 for r in records if r["k"] == HANG),
    )
    lost = acked - succeeded
    if broker_states is not None:
        from conveyor.job import JobState

        report.broker_checked = True
        lost |= {i for i in acked if broker_states.get(i) is not JobState.COMPLETED}
    report.lost = sorted(lost)
    report.overlaps = _overlaps(records, runs)
    report.recovery_s, report.unrecovered = _recovery(records, runs)
    return report


async def broker_states(broker: Broker | str, job_ids: Iterable[str]) -> dict[str, JobState]:
    """The current state of each job (absent ids are left out), read from ``broker``."""
    from conveyor.brokers import open_broker

    own = isinstance(broker, str)
    b: Broker = open_broker(broker) if isinstance(broker, str) else broker
    if own:
        await b.connect()
    try:
        states = {}
        for job_id in job_ids:
            job = await b.get(job_id)
            if job is not None:
                states[job_id] = job.state
        return states
    finally:
        if own:
            await b.close()


async def acheck(directory: str | os.PathLike[str], broker: Broker | str | None = None) -> Report:
    """:func:`check` for async code (``broker``: a connected Broker or a URL)."""
    records = read_records(directory)
    states = None
    if broker is not None:
        states = await broker_states(broker, _enqueued(records))
    return analyse(records, states)


def check(directory: str | os.PathLike[str], broker: str | None = None) -> Report:
    """Check the ledger in ``directory`` once the queue has drained (not inside a running loop).

    ``broker`` (a broker URL; async code passes a connected Broker to :func:`acheck`) adds the
    broker's view: every acknowledged job must be ``completed`` there too.
    """
    return asyncio.run(acheck(directory, broker))


def _enqueued(records: list[dict[str, Any]]) -> Iterator[str]:
    seen: set[str] = set()
    for r in records:
        if r["k"] == ACKED and r["id"] not in seen:
            seen.add(r["id"])
            yield r["id"]


__all__ = [
    "Ledger",
    "Producer",
    "Report",
    "acheck",
    "analyse",
    "broker_states",
    "check",
    "read_records",
]
