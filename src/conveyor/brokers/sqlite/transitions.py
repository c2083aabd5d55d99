"""The SQLite broker's transitions and reads, as plain functions of a connection.

They run on the database thread (see :mod:`.connection`), each write inside the one ``BEGIN
IMMEDIATE`` transaction the connection opened for it, so a transition and its events commit
together or not at all. They read time from the broker's clock on that thread, after the write lock
is held, so a lease's deadline is not shortened by time spent waiting for another process's lock.
"""

from __future__ import annotations

import secrets
import sqlite3
from collections.abc import Sequence
from typing import Any, Final

import msgspec

from conveyor.brokers.base import EventKind, ExpiredReport, JobEvent, LogPage, all_states_zero
from conveyor.brokers.sqlite.queries import QUERIES
from conveyor.brokers.sqlite.rows import enqueue_params, event_from_row, job_from_row
from conveyor.clock import Clock
from conveyor.codec import Codec
from conveyor.errors import ConveyorError, ErrorCode, InvalidJobError, error_for_code
from conveyor.job import Job, JobState, Lease, Transition

Q: Final = QUERIES
_json_encode: Final = msgspec.json.Encoder().encode
_PRIORITY_COLUMN: Final = 7  # of a job row: sort key for reserve, with seq (column 0)


def _json(value: Any) -> str:
    # Text, not bytes: SQLite >= 3.45 would read a BLOB parameter as binary JSONB.
    return _json_encode(value).decode()


def _leases_json(leases: Sequence[Lease]) -> str:
    return _json([[lease.job_id, lease.token] for lease in leases])


class Transitions:
    """Every broker operation as ``op(conn, ...)``, run (with its state) on the database thread.

    Args:
        codec: encodes payloads and results.
        clock: the broker's clock.
        max_log_lines: log lines kept per job.
        event_retention: how many recent events the events table keeps.
    """

    def __init__(
        self, *, codec: Codec, clock: Clock, max_log_lines: int, event_retention: int
    ) -> None:
        self.codec = codec
        self.clock = clock
        self.max_log_lines = max_log_lines
        self.event_retention = event_retention
        # Trim the events table once per this many new events rather than on every insert.
        self._trim_every = max(1, min(1000, event_retention // 10))
        self._untrimmed = 0

    # -- events ----------------------------------------------------------------------------------

    def _counted(self, conn: sqlite3.Connection, n: int) -> None:
        """Count ``n`` new events; past the threshold, trim in the current transaction."""
        self._untrimmed += n
        if self._untrimmed >= self._trim_every:
            conn.execute(Q["trim_events"], {"retention": self.event_retention})
            self._untrimmed = 0

    def _emit_state(
        self, conn: sqlite3.Connection, ids: Sequence[str], transition: str, now: int
    ) -> None:
        if ids:
            conn.execute(Q["emit_state"], {"ids": _json(ids), "transition": transition, "now": now})
            self._counted(conn, len(ids))

    def _emit(self, conn: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> None:
        """Insert 'progress', 'log' or 'deleted' events (rows laid out as ``insert_event``)."""
        if rows:
            conn.executemany(Q["insert_event"], rows)
            self._counted(conn, len(rows))

    # -- failures --------------------------------------------------------------------------------

    @staticmethod
    def _lease_error(conn: sqlite3.Connection, lease: Lease, action: str) -> ConveyorError:
        """Why a lease transition matched no row: JOB_NOT_FOUND or LEASE_LOST."""
        row = conn.execute(Q["lease_status"], {"id": lease.job_id, "token": lease.token}).fetchone()
        # The row exists but the update matched nothing, so its code is LEASE_LOST (-2).
        code = ErrorCode.JOB_NOT_FOUND if row is None else ErrorCode(row[0] or -2)
        return error_for_code(code, action=action, job_id=lease.job_id)

    @staticmethod
    def _state_error(
        conn: sqlite3.Connection, job_id: str, action: str, allowed: str
    ) -> ConveyorError:
        """Why a control transition matched no row: JOB_NOT_FOUND or INVALID_TRANSITION."""
        row = conn.execute(Q["job_state"], {"id": job_id}).fetchone()
        if row is None:
            return error_for_code(ErrorCode.JOB_NOT_FOUND, action=action, job_id=job_id)
        exc = error_for_code(ErrorCode.INVALID_TRANSITION, action=action, job_id=job_id)
        return type(exc)(f"{exc.message} (the job is {row[0]}; {action} applies to {allowed})")

    # -- producers -------------------------------------------------------------------------------

    def enqueue(self, conn: sqlite3.Connection, jobs: list[Job]) -> list[str]:
        """Store validated jobs (see ``Broker.enqueue``); a taken id raises and writes nothing."""
        holders: dict[tuple[str, str], str] = {}
        keys = [[job.queue, job.dedup_key] for job in jobs if job.dedup_key is not None]
        if keys:
            for queue, key, job_id in conn.execute(Q["live_dedup_ids"], {"keys": _json(keys)}):
                holders[(queue, key)] = job_id
        out: list[str] = []
        fresh: list[Job] = []
        for job in jobs:
            if job.dedup_key is not None:
                key_of = (job.queue, job.dedup_key)
                holder = holders.get(key_of)
                if holder is not None:
                    out.append(holder)
                    continue
                holders[key_of] = job.id
            out.append(job.id)
            fresh.append(job)
        ids = [job.id for job in fresh]
        taken = {row[0] for row in conn.execute(Q["existing_ids"], {"ids": _json(ids)})}
        if taken or len(set(ids)) != len(ids):
            repeated = taken or {i for i in ids if ids.count(i) > 1}
            raise InvalidJobError(
                f"job id {sorted(repeated)[0]!r} is already in use; give each job a new id "
                "(conveyor.job.new_job_id()) or use dedup_key for idempotent enqueue"
            )
        codec = self.codec
        conn.executemany(Q["enqueue"], [enqueue_params(job, codec) for job in fresh])
        conn.executemany(Q["remember_queue"], [(q,) for q in {job.queue for job in fresh}])
        self._emit_state(conn, ids, Transition.ENQUEUE, self.clock.now_ms())
        return out

    def start(self, conn: sqlite3.Connection, job_id: str) -> Job:
        """``pending`` -> ``queued``/``scheduled``."""
        now = self.clock.now_ms()
        row = conn.execute(Q["start"], {"id": job_id, "now": now}).fetchone()
        if row is None:
            raise self._state_error(conn, job_id, Transition.START, "pending jobs only")
        self._emit_state(conn, [job_id], Transition.START, now)
        return job_from_row(row, self.codec)

    # -- consumers -------------------------------------------------------------------------------

    def reserve(
        self, conn: sqlite3.Connection, queue: str, n: int, lease_ms: int, worker_id: str | None
    ) -> list[Job]:
        """Promote due scheduled jobs of ``queue``, then take up to ``n`` by (priority, seq)."""
        now = self.clock.now_ms()
        self._promote(conn, queue, now, max(n, 1000))
        if n <= 0:
            return []
        params = {
            "queue": queue,
            "n": n,
            "now": now,
            "expires": now + lease_ms,
            "worker_id": worker_id,
            # One random prefix per call; the job's seq makes each token unique.
            "token": secrets.token_hex(8),
        }
        rows = conn.execute(Q["reserve"], params).fetchall()
        if not rows:
            return []
        rows.sort(key=lambda r: (r[_PRIORITY_COLUMN], r[0]))
        codec = self.codec
        jobs = [job_from_row(row, codec) for row in rows]
        self._emit_state(conn, [job.id for job in jobs], Transition.RESERVE, now)
        return jobs

    def _promote(self, conn: sqlite3.Connection, queue: str, now: int, limit: int) -> int:
        params = {"queue": queue, "now": now, "limit": limit}
        ids = [row[0] for row in conn.execute(Q["promote_scheduled"], params)]
        self._emit_state(conn, ids, Transition.PROMOTE_SCHEDULED, now)
        return len(ids)

    def promote_scheduled(self, conn: sqlite3.Connection, queue: str, limit: int) -> int:
        """``scheduled`` -> ``queued`` for due jobs of ``queue``; the count."""
        return self._promote(conn, queue, self.clock.now_ms(), limit)

    def extend_lease(
        self, conn: sqlite3.Connection, leases: Sequence[Lease], lease_ms: int
    ) -> list[bool]:
        """Push held leases' deadlines; per lease, whether it is still held."""
        params = {"leases": _leases_json(leases), "expires": self.clock.now_ms() + lease_ms}
        held = set(conn.execute(Q["extend_lease"], params))
        return [(lease.job_id, lease.token) in held for lease in leases]

    def ack(self, conn: sqlite3.Connection, lease: Lease, result: bytes | None) -> None:
        """``running`` -> ``completed``."""
        now = self.clock.now_ms()
        params = {"id": lease.job_id, "token": lease.token, "result": result, "now": now}
        if conn.execute(Q["ack"], params).rowcount != 1:
            raise self._lease_error(conn, lease, Transition.ACK)
        self._emit_state(conn, [lease.job_id], Transition.ACK, now)

    def ack_many(
        self, conn: sqlite3.Connection, items: Sequence[tuple[Lease, bytes | None]]
    ) -> list[bool]:
        """Ack every held lease of ``items`` in this one transaction; per item, whether it was."""
        if all(result is None for _, result in items):
            by_id = {lease.job_id: lease.token for lease, _ in items}
            if len(by_id) == len({(lease.job_id, lease.token) for lease, _ in items}):
                return self._ack_without_results(conn, items)
        leases = [lease for lease, _ in items]
        held = set(conn.execute(Q["held_leases"], {"leases": _leases_json(leases)}))
        now = self.clock.now_ms()
        out: list[bool] = []
        params: list[dict[str, Any]] = []
        for lease, result in items:
            ok = (lease.job_id, lease.token) in held
            if ok:
                held.discard((lease.job_id, lease.token))  # a repeated lease acks once
                params.append(
                    {"id": lease.job_id, "token": lease.token, "result": result, "now": now}
                )
            out.append(ok)
        if params:
            conn.executemany(Q["ack"], params)
            self._emit_state(conn, [p["id"] for p in params], Transition.ACK, now)
        return out

    def _ack_without_results(
        self, conn: sqlite3.Connection, items: Sequence[tuple[Lease, bytes | None]]
    ) -> list[bool]:
        """ack_many of result-less items, one token per job: one UPDATE for the batch."""
        now = self.clock.now_ms()
        leases = [lease for lease, _ in items]
        acked = {
            row[0]
            for row in conn.execute(Q["ack_leases"], {"leases": _leases_json(leases), "now": now})
        }
        out: list[bool] = []
        for lease in leases:
            out.append(lease.job_id in acked)
            acked.discard(lease.job_id)  # a repeated lease acks once
        emitted = [lease.job_id for lease, ok in zip(leases, out, strict=True) if ok]
        self._emit_state(conn, emitted, Transition.ACK, now)
        return out

    def ack_and_reserve(
        self,
        conn: sqlite3.Connection,
        items: Sequence[tuple[Lease, bytes | None]],
        queue: str,
        n: int,
        lease_ms: int,
        worker_id: str | None,
    ) -> tuple[list[bool], list[Job]]:
        """:meth:`ack_many` then :meth:`reserve`, in this one transaction."""
        held = self.ack_many(conn, items) if items else []
        return held, self.reserve(conn, queue, n, lease_ms, worker_id)

    def _finish_lease(
        self,
        conn: sqlite3.Connection,
        transition: Transition,
        lease: Lease,
        **params: Any,
    ) -> Job:
        """Run a lease transition that returns the job row (retry, dead_letter, release)."""
        now = self.clock.now_ms()
        params.update(id=lease.job_id, token=lease.token, now=now)
        row = conn.execute(Q[transition], params).fetchone()
        if row is None:
            raise self._lease_error(conn, lease, transition)
        self._emit_state(conn, [lease.job_id], transition, now)
        return job_from_row(row, self.codec)

    def retry(
        self,
        conn: sqlite3.Connection,
        lease: Lease,
        run_at_ms: int,
        error: str | None,
        traceback: str | None,
    ) -> Job:
        """``running`` -> ``scheduled`` (or ``queued`` if due), charging one."""
        return self._finish_lease(
            conn, Transition.RETRY, lease, run_at=run_at_ms, error=error, traceback=traceback
        )

    def dead_letter(
        self,
        conn: sqlite3.Connection,
        lease: Lease,
        reason: str,
        error: str | None,
        traceback: str | None,
    ) -> Job:
        """``running`` -> ``failed``, charging one."""
        return self._finish_lease(
            conn, Transition.DEAD_LETTER, lease, reason=reason, error=error, traceback=traceback
        )

    def release(self, conn: sqlite3.Connection, lease: Lease) -> Job:
        """``running`` -> ``queued``, charging nothing."""
        return self._finish_lease(conn, Transition.RELEASE, lease)

    def requeue_expired(self, conn: sqlite3.Connection, queue: str, limit: int) -> ExpiredReport:
        """Recover running jobs of ``queue`` whose lease has expired."""
        now = self.clock.now_ms()
        params = {"queue": queue, "now": now, "limit": limit}
        rows = conn.execute(Q["requeue_expired"], params).fetchall()
        report = ExpiredReport(requeued=[], dead_lettered=[])
        for job_id, state in rows:
            (report.requeued if state == JobState.QUEUED else report.dead_lettered).append(job_id)
        self._emit_state(conn, [row[0] for row in rows], Transition.REQUEUE_EXPIRED, now)
        return report

    # -- control plane ---------------------------------------------------------------------------

    def cancel(self, conn: sqlite3.Connection, job_id: str) -> Job:
        """pending/queued/scheduled/running -> ``stopped``."""
        now = self.clock.now_ms()
        row = conn.execute(Q["cancel"], {"id": job_id, "now": now}).fetchone()
        if row is None:
            raise self._state_error(
                conn, job_id, Transition.CANCEL, "pending, queued, scheduled or running jobs"
            )
        self._emit_state(conn, [job_id], Transition.CANCEL, now)
        return job_from_row(row, self.codec)

    def _removed(self, conn: sqlite3.Connection, rows: list[Any], action: str) -> int:
        """Drop the logs of deleted jobs (rows of id, queue, task) and publish 'deleted' events."""
        if rows:
            now = self.clock.now_ms()
            conn.execute(Q["delete_logs"], {"ids": _json([row[0] for row in rows])})
            self._emit(
                conn,
                [
                    (EventKind.DELETED, job_id, queue, now, action, task, None, None, None)
                    for job_id, queue, task in rows
                ],
            )
        return len(rows)

    def delete(self, conn: sqlite3.Connection, job_id: str) -> None:
        """Remove a job and its logs."""
        rows = conn.execute(Q["delete"], {"id": job_id}).fetchall()
        if not rows:
            raise error_for_code(ErrorCode.JOB_NOT_FOUND, action="delete", job_id=job_id)
        self._removed(conn, rows, "delete")

    def redrive(self, conn: sqlite3.Connection, queue: str, job_ids: list[str] | None) -> int:
        """Dead letters (and, by id, stopped jobs) back to ``queued``, reset; the count."""
        if job_ids is None:
            cursor = conn.execute(Q["redrive_candidates"], {"queue": queue})
        else:
            params = {"queue": queue, "ids": _json(job_ids)}
            cursor = conn.execute(Q["redrive_candidates_by_id"], params)
        ids = [row[0] for row in cursor]
        if not ids:
            return 0
        chosen = {"ids": _json(ids)}
        conn.execute(Q["redrive_drop_dedup"], chosen)
        conn.execute(Q["redrive"], chosen).fetchall()
        self._emit_state(conn, ids, Transition.REDRIVE, self.clock.now_ms())
        return len(ids)

    def purge(self, conn: sqlite3.Connection, queue: str, states: list[str]) -> int:
        """Delete jobs of ``queue`` in ``states`` (running already refused); the count."""
        rows = conn.execute(Q["purge"], {"queue": queue, "states": _json(states)}).fetchall()
        return self._removed(conn, rows, "purge")

    def cleanup(self, conn: sqlite3.Connection, retention_ms: int, queue: str | None) -> int:
        """Delete finished jobs that finished over ``retention_ms`` ago; the count."""
        params = {"cutoff": self.clock.now_ms() - retention_ms, "queue": queue}
        rows = conn.execute(Q["cleanup"], params).fetchall()
        return self._removed(conn, rows, "cleanup")

    # -- progress and logs -----------------------------------------------------------------------

    def set_progress(
        self, conn: sqlite3.Connection, lease: Lease, progress: int | None, description: str | None
    ) -> None:
        """Record progress and/or description of a running job (already clamped and cut)."""
        params = {
            "id": lease.job_id,
            "token": lease.token,
            "progress": progress,
            "description": description,
        }
        row = conn.execute(Q["set_progress"], params).fetchone()
        if row is None:
            raise self._lease_error(conn, lease, "set_progress")
        if progress is None and description is None:
            return  # nothing changed: the lease is checked, no event
        queue, stored_progress, stored_description = row
        now = self.clock.now_ms()
        self._emit(
            conn,
            [
                (
                    EventKind.PROGRESS,
                    lease.job_id,
                    queue,
                    now,
                    None,
                    None,
                    stored_progress,
                    stored_description,
                    None,
                )
            ],
        )

    def append_log(
        self, conn: sqlite3.Connection, job_id: str, lines: list[str], dropped: int = 0
    ) -> None:
        """Append lines, keep the newest ``max_log_lines``, publish one event per line.

        ``dropped`` lines the caller let go count as logged before ``lines`` (never stored).
        """
        n = len(lines) + dropped
        row = conn.execute(Q["count_log_lines"], {"id": job_id, "n": n}).fetchone()
        if row is None:
            raise error_for_code(ErrorCode.JOB_NOT_FOUND, action="append_log", job_id=job_id)
        total, queue = row
        first = total - len(lines)  # line number of lines[0]
        keep_from = max(0, total - self.max_log_lines)
        skip = max(0, keep_from - first)  # lines of this append already past the cap
        conn.executemany(
            Q["insert_log_line"],
            [(job_id, first + i, line) for i, line in enumerate(lines) if i >= skip],
        )
        if keep_from > 0:
            conn.execute(Q["trim_logs"], {"id": job_id, "keep_from": keep_from})
        now = self.clock.now_ms()
        self._emit(
            conn,
            [(EventKind.LOG, job_id, queue, now, None, None, None, None, line) for line in lines],
        )

    @staticmethod
    def logs(conn: sqlite3.Connection, job_id: str, offset: int, limit: int | None) -> LogPage:
        """A job's kept log lines from ``offset``."""
        row = conn.execute(Q["log_totals"], {"id": job_id}).fetchone()
        if row is None:
            raise error_for_code(ErrorCode.JOB_NOT_FOUND, action="logs", job_id=job_id)
        total, kept = row
        params = {"id": job_id, "offset": offset, "limit": -1 if limit is None else limit}
        lines = [line for (line,) in conn.execute(Q["log_lines"], params)]
        return LogPage(lines=lines, dropped=total - kept, total=kept)

    # -- reads -----------------------------------------------------------------------------------

    def get(self, conn: sqlite3.Connection, job_id: str) -> Job | None:
        """The job with this id, or None."""
        row = conn.execute(Q["get"], {"id": job_id}).fetchone()
        return None if row is None else job_from_row(row, self.codec)

    def list_jobs(
        self,
        conn: sqlite3.Connection,
        queue: str | None,
        states: list[str] | None,
        task: str | None,
        limit: int,
        before: int | None,
    ) -> tuple[list[Job], int | None]:
        """One page, newest first, and the seq cursor of the next page (None on the last)."""
        params = {
            "queue": queue,
            "states": None if states is None else _json(states),
            "task": task,
            "before": before,
            "limit": limit + 1,  # one more tells whether a next page exists
        }
        rows = conn.execute(Q["list_jobs"], params).fetchall()
        more = len(rows) > limit
        rows = rows[:limit]
        codec = self.codec
        return [job_from_row(row, codec) for row in rows], (rows[-1][0] if more else None)

    @staticmethod
    def counts(conn: sqlite3.Connection, queue: str | None) -> dict[str, dict[JobState, int]]:
        """Per queue, jobs per state, every state present; every known queue, or just ``queue``."""
        if queue is not None:
            row = all_states_zero()
            for state, n in conn.execute(Q["counts_of_queue"], {"queue": queue}):
                row[JobState(state)] = n
            return {queue: row}
        out = {name: all_states_zero() for (name,) in conn.execute(Q["queue_names"])}
        for name, state, n in conn.execute(Q["counts"]):
            out.setdefault(name, all_states_zero())[JobState(state)] = n
        return out

    @staticmethod
    def ping(conn: sqlite3.Connection) -> None:
        """Read something, so a broken file or connection shows up."""
        conn.execute(Q["ping"]).fetchone()

    @staticmethod
    def queue_names(conn: sqlite3.Connection) -> list[str]:
        """Every queue ever used, sorted."""
        return [name for (name,) in conn.execute(Q["queue_names"])]

    @staticmethod
    def wait_state(conn: sqlite3.Connection, queues: Sequence[str]) -> tuple[bool, int | None]:
        """Whether one of ``queues`` has a queued job; their earliest scheduled run_at_ms."""
        ready, earliest = conn.execute(Q["wait_state"], {"queues": _json(list(queues))}).fetchone()
        return bool(ready), earliest

    @staticmethod
    def last_event_id(conn: sqlite3.Connection) -> int:
        """The newest event id ever assigned (0 before the first)."""
        value: int = conn.execute(Q["last_event_id"]).fetchone()[0]
        return value

    @staticmethod
    def events_after(
        conn: sqlite3.Connection, after: int, queue: str | None, job_id: str | None, limit: int
    ) -> tuple[list[JobEvent], int]:
        """Up to ``limit`` matching events after ``after``, and the cursor to continue from.

        The cursor moves past non-matching events too, up to the newest event looked at.
        """
        params = {"after": after, "queue": queue, "job_id": job_id, "limit": limit}
        rows = conn.execute(Q["events_after"], params).fetchall()
        if len(rows) < limit:
            # Everything matching up to now was read: skip ahead so filtered-out events are not
            # scanned again on the next poll.
            newest = conn.execute(Q["last_event_id"]).fetchone()[0]
            cursor = max(after, newest)
        else:
            cursor = rows[-1][0]
        return [event_from_row(row) for row in rows], cursor
