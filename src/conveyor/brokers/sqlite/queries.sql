-- Named queries of the SQLite broker, one "-- name: NAME" block each (parsed by queries.py).
--
-- Transition queries carry the transition's name (reserve, ack, retry, ...), the same word the
-- Python method, the Lua script and the log "action" use. Every transition runs inside one
-- BEGIN IMMEDIATE transaction opened by connection.py; several queries of one transition (the
-- change, its events, its trims) share that transaction.
--
-- Job rows are always read with the same 26 columns, in this order (rows.py decodes them):
--   seq, id, task, queue, payload, options, state, priority, attempts, max_attempts, lost_leases,
--   max_lost_leases, enqueued_ms, run_at_ms, started_ms, finished_ms, progress, description,
--   result, error, traceback, failure_reason, dedup_key, lease_token, lease_expires_ms, worker_id
--
-- Variable-length lists arrive as one JSON array parameter read with json_each, never as SQL text.
-- json_extract (not ->>) keeps the floor at SQLite 3.35, the first with RETURNING.

-- ------------------------------------------------------------------ transactions and connection

-- name: begin_immediate
BEGIN IMMEDIATE

-- name: begin_deferred
BEGIN

-- name: commit
COMMIT

-- name: rollback
ROLLBACK

-- name: journal_mode
PRAGMA journal_mode

-- name: journal_mode_wal
PRAGMA journal_mode = WAL

-- name: synchronous_normal
PRAGMA synchronous = NORMAL

-- name: synchronous_full
PRAGMA synchronous = FULL

-- ---------------------------------------------------------------------------------- schema

-- name: table_names
SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'

-- name: schema_version
SELECT max(version) FROM schema_version

-- name: insert_schema_version
INSERT INTO schema_version (version) VALUES (:version)

-- name: get_setting
SELECT value FROM settings WHERE name = :name

-- name: put_setting
INSERT INTO settings (name, value) VALUES (:name, :value)

-- ---------------------------------------------------------------------------------- enqueue

-- name: live_dedup_ids
-- :keys is a JSON array of [queue, dedup_key]; returns the live job holding each key.
SELECT j.queue, j.dedup_key, j.id
FROM json_each(:keys) AS k
JOIN jobs AS j
    ON j.queue = json_extract(k.value, '$[0]') AND j.dedup_key = json_extract(k.value, '$[1]')
WHERE j.dedup_key IS NOT NULL AND j.state IN ('pending', 'queued', 'scheduled', 'running')

-- name: enqueue
-- executemany, positional: id, queue, task, payload, options, state, priority, max_attempts,
-- max_lost_leases, enqueued_ms, run_at_ms, dedup_key
INSERT INTO jobs (
    id, queue, task, payload, options, state, priority, max_attempts, max_lost_leases,
    enqueued_ms, run_at_ms, dedup_key
) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)

-- name: remember_queue
-- executemany, positional: name
INSERT OR IGNORE INTO queues (name) VALUES (?)

-- -------------------------------------------------------------------------------- consumers

-- name: promote_scheduled
-- Due scheduled jobs of :queue become queued, earliest first, at most :limit of them.
UPDATE jobs SET state = 'queued'
WHERE seq IN (
    SELECT seq FROM jobs
    WHERE queue = :queue AND state = 'scheduled' AND run_at_ms <= :now
    ORDER BY run_at_ms
    LIMIT :limit
)
RETURNING id

-- name: reserve
-- The first :n queued jobs of :queue by (priority, seq) become running under a fresh lease.
-- Tokens are :token (random per call) plus the job's seq, so each is unique and unguessable.
-- RETURNING gives no order guarantee: the caller sorts by (priority, seq).
UPDATE jobs SET
    state = 'running',
    lease_token = :token || '.' || seq,
    lease_expires_ms = :expires,
    started_ms = :now,
    worker_id = :worker_id
WHERE seq IN (
    SELECT seq FROM jobs
    WHERE queue = :queue AND state = 'queued'
    ORDER BY priority, seq
    LIMIT :n
)
RETURNING seq, id, task, queue, payload, options, state, priority, attempts, max_attempts,
    lost_leases, max_lost_leases, enqueued_ms, run_at_ms, started_ms, finished_ms, progress,
    description, result, error, traceback, failure_reason, dedup_key, lease_token,
    lease_expires_ms, worker_id

-- name: extend_lease
-- :leases is a JSON array of [job_id, token]; returns the (id, token) pairs still held.
UPDATE jobs SET lease_expires_ms = :expires
FROM (
    SELECT json_extract(value, '$[0]') AS job_id, json_extract(value, '$[1]') AS token
    FROM json_each(:leases)
) AS l
WHERE jobs.id = l.job_id AND jobs.state = 'running' AND jobs.lease_token = l.token
RETURNING jobs.id, jobs.lease_token

-- name: lease_status
-- 0 when :token holds the running job :id, else -2 (LEASE_LOST); no row means JOB_NOT_FOUND.
SELECT CASE WHEN state = 'running' AND lease_token = :token THEN 0 ELSE -2 END
FROM jobs WHERE id = :id

-- name: held_leases
-- :leases is a JSON array of [job_id, token]; returns the (id, token) pairs still held.
SELECT j.id, j.lease_token
FROM json_each(:leases) AS l
JOIN jobs AS j ON j.id = json_extract(l.value, '$[0]')
WHERE j.state = 'running' AND j.lease_token = json_extract(l.value, '$[1]')

-- name: ack
-- Also run with executemany by ack_many (named parameters per row).
UPDATE jobs SET
    state = 'completed',
    attempts = attempts + 1,
    finished_ms = :now,
    result = :result,
    lease_token = NULL,
    lease_expires_ms = NULL
WHERE id = :id AND state = 'running' AND lease_token = :token

-- name: ack_leases
-- ack_many for the items without a result: :leases is a JSON array of [job_id, token]; one
-- statement for the batch (an executemany of "ack" costs one statement per job); returns the ids
-- of the jobs acked.
UPDATE jobs SET
    state = 'completed',
    attempts = attempts + 1,
    finished_ms = :now,
    result = NULL,
    lease_token = NULL,
    lease_expires_ms = NULL
FROM (
    SELECT json_extract(value, '$[0]') AS job_id, json_extract(value, '$[1]') AS token
    FROM json_each(:leases)
) AS l
WHERE jobs.id = l.job_id AND jobs.state = 'running' AND jobs.lease_token = l.token
RETURNING jobs.id

-- name: retry
UPDATE jobs SET
    state = CASE WHEN :run_at > :now THEN 'scheduled' ELSE 'queued' END,
    run_at_ms = :run_at,
    attempts = attempts + 1,
    error = :error,
    traceback = :traceback,
    lease_token = NULL,
    lease_expires_ms = NULL
WHERE id = :id AND state = 'running' AND lease_token = :token
RETURNING seq, id, task, queue, payload, options, state, priority, attempts, max_attempts,
    lost_leases, max_lost_leases, enqueued_ms, run_at_ms, started_ms, finished_ms, progress,
    description, result, error, traceback, failure_reason, dedup_key, lease_token,
    lease_expires_ms, worker_id

-- name: dead_letter
UPDATE jobs SET
    state = 'failed',
    attempts = attempts + 1,
    failure_reason = :reason,
    error = :error,
    traceback = :traceback,
    finished_ms = :now,
    lease_token = NULL,
    lease_expires_ms = NULL
WHERE id = :id AND state = 'running' AND lease_token = :token
RETURNING seq, id, task, queue, payload, options, state, priority, attempts, max_attempts,
    lost_leases, max_lost_leases, enqueued_ms, run_at_ms, started_ms, finished_ms, progress,
    description, result, error, traceback, failure_reason, dedup_key, lease_token,
    lease_expires_ms, worker_id

-- name: release
-- Back to queued without charging an attempt; seq is untouched, so the job keeps its place.
UPDATE jobs SET
    state = 'queued',
    lease_token = NULL,
    lease_expires_ms = NULL
WHERE id = :id AND state = 'running' AND lease_token = :token
RETURNING seq, id, task, queue, payload, options, state, priority, attempts, max_attempts,
    lost_leases, max_lost_leases, enqueued_ms, run_at_ms, started_ms, finished_ms, progress,
    description, result, error, traceback, failure_reason, dedup_key, lease_token,
    lease_expires_ms, worker_id

-- name: requeue_expired
-- Running jobs of :queue whose lease deadline has passed: charge an attempt and a lost lease, then
-- dead-letter (poison first, then exhausted) or queue again at once. SET expressions read the old
-- row, hence the "+ 1" in every test.
UPDATE jobs SET
    attempts = attempts + 1,
    lost_leases = lost_leases + 1,
    state = CASE
        WHEN lost_leases + 1 >= max_lost_leases OR attempts + 1 >= max_attempts THEN 'failed'
        ELSE 'queued'
    END,
    failure_reason = CASE
        WHEN lost_leases + 1 >= max_lost_leases THEN 'poison'
        WHEN attempts + 1 >= max_attempts THEN 'exhausted'
        ELSE failure_reason
    END,
    error = CASE
        WHEN lost_leases + 1 >= max_lost_leases OR attempts + 1 >= max_attempts
            THEN 'the job''s lease expired ' || (lost_leases + 1)
                || ' time(s): its worker died or stalled'
        ELSE error
    END,
    finished_ms = CASE
        WHEN lost_leases + 1 >= max_lost_leases OR attempts + 1 >= max_attempts THEN :now
        ELSE finished_ms
    END,
    lease_token = NULL,
    lease_expires_ms = NULL
WHERE seq IN (
    SELECT seq FROM jobs
    WHERE queue = :queue AND state = 'running' AND lease_expires_ms < :now
    ORDER BY lease_expires_ms
    LIMIT :limit
)
RETURNING id, state

-- ---------------------------------------------------------------------------- control plane

-- name: job_state
SELECT state FROM jobs WHERE id = :id

-- name: existing_ids
-- Which of :ids (a JSON array) are already taken.
SELECT id FROM jobs WHERE id IN (SELECT value FROM json_each(:ids))

-- name: start
UPDATE jobs SET state = CASE WHEN run_at_ms > :now THEN 'scheduled' ELSE 'queued' END
WHERE id = :id AND state = 'pending'
RETURNING seq, id, task, queue, payload, options, state, priority, attempts, max_attempts,
    lost_leases, max_lost_leases, enqueued_ms, run_at_ms, started_ms, finished_ms, progress,
    description, result, error, traceback, failure_reason, dedup_key, lease_token,
    lease_expires_ms, worker_id

-- name: cancel
UPDATE jobs SET
    state = 'stopped',
    finished_ms = :now,
    lease_token = NULL,
    lease_expires_ms = NULL
WHERE id = :id AND state IN ('pending', 'queued', 'scheduled', 'running')
RETURNING seq, id, task, queue, payload, options, state, priority, attempts, max_attempts,
    lost_leases, max_lost_leases, enqueued_ms, run_at_ms, started_ms, finished_ms, progress,
    description, result, error, traceback, failure_reason, dedup_key, lease_token,
    lease_expires_ms, worker_id

-- name: delete
DELETE FROM jobs WHERE id = :id RETURNING id, queue, task

-- name: redrive_candidates
-- The failed jobs of :queue, in enqueue order.
SELECT id FROM jobs WHERE queue = :queue AND state = 'failed' ORDER BY seq

-- name: redrive_candidates_by_id
-- The failed or stopped jobs of :queue among :ids (a JSON array), in enqueue order.
SELECT id FROM jobs
WHERE queue = :queue AND state IN ('failed', 'stopped')
    AND id IN (SELECT value FROM json_each(:ids))
ORDER BY seq

-- name: redrive_drop_dedup
-- Jobs about to be re-driven (:ids, a JSON array) give up their dedup_key when a live job holds
-- it now, or an earlier job of this redrive claims it: one key keeps at most one live job, and
-- nothing is skipped.
UPDATE jobs SET dedup_key = NULL
WHERE id IN (SELECT value FROM json_each(:ids)) AND dedup_key IS NOT NULL
    AND (
        EXISTS (
            SELECT 1 FROM jobs AS o
            WHERE o.queue = jobs.queue AND o.dedup_key = jobs.dedup_key
                AND o.state IN ('pending', 'queued', 'scheduled', 'running')
        )
        OR EXISTS (
            SELECT 1 FROM jobs AS o
            WHERE o.queue = jobs.queue AND o.dedup_key = jobs.dedup_key AND o.seq < jobs.seq
                AND o.id IN (SELECT value FROM json_each(:ids))
        )
    )

-- name: redrive
-- The jobs :ids (a JSON array; checked by redrive_candidates*) back to queued, reset.
UPDATE jobs SET
    state = 'queued',
    attempts = 0,
    lost_leases = 0,
    finished_ms = NULL,
    result = NULL,
    error = NULL,
    traceback = NULL,
    failure_reason = NULL
WHERE id IN (SELECT value FROM json_each(:ids))
RETURNING id

-- name: purge
-- :states is a JSON array of state names (never 'running': the broker refuses that first).
DELETE FROM jobs
WHERE queue = :queue AND state IN (SELECT value FROM json_each(:states))
RETURNING id, queue, task

-- name: cleanup
DELETE FROM jobs
WHERE state IN ('completed', 'failed', 'stopped') AND finished_ms < :cutoff
    AND (:queue IS NULL OR queue = :queue)
RETURNING id, queue, task

-- name: delete_logs
-- Logs of deleted jobs; :ids is a JSON array.
DELETE FROM logs WHERE job_id IN (SELECT value FROM json_each(:ids))

-- ------------------------------------------------------------------------- progress and logs

-- name: set_progress
UPDATE jobs SET
    progress = coalesce(:progress, progress),
    description = coalesce(:description, description)
WHERE id = :id AND state = 'running' AND lease_token = :token
RETURNING queue, progress, description

-- name: count_log_lines
-- Reserve :n line numbers for an append; returns the new total and the job's queue.
UPDATE jobs SET log_total = log_total + :n WHERE id = :id RETURNING log_total, queue

-- name: insert_log_line
-- executemany, positional: job_id, n, line
INSERT INTO logs (job_id, n, line) VALUES (?, ?, ?)

-- name: trim_logs
-- The per-job cap: drop lines numbered below :keep_from.
DELETE FROM logs WHERE job_id = :id AND n < :keep_from

-- name: log_totals
SELECT log_total, (SELECT count(*) FROM logs WHERE job_id = :id) FROM jobs WHERE id = :id

-- name: log_lines
SELECT line FROM logs WHERE job_id = :id ORDER BY n LIMIT :limit OFFSET :offset

-- ---------------------------------------------------------------------------------- events

-- name: emit_state
-- One 'state' event per job in :ids (a JSON array), as the jobs are now, in enqueue order.
INSERT INTO events (kind, job_id, queue, ts_ms, state, transition, task, attempts, error)
SELECT 'state', id, queue, :now, state, :transition, task, attempts, error
FROM jobs
WHERE id IN (SELECT value FROM json_each(:ids))
ORDER BY seq

-- name: insert_event
-- executemany, positional: kind, job_id, queue, ts_ms, transition, task, progress, description,
-- line (the 'progress', 'log' and 'deleted' events; 'state' events come from emit_state)
INSERT INTO events (kind, job_id, queue, ts_ms, transition, task, progress, description, line)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)

-- name: last_event_id
-- The newest event id ever assigned (sqlite_sequence survives trimming), 0 before the first.
SELECT coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'events'), 0)

-- name: trim_events
-- Keep the newest :retention events.
DELETE FROM events
WHERE id <= (SELECT seq FROM sqlite_sequence WHERE name = 'events') - :retention

-- name: events_after
SELECT id, kind, job_id, queue, ts_ms, state, transition, task, attempts, progress, description,
    line, error
FROM events
WHERE id > :after
    AND (:queue IS NULL OR queue = :queue)
    AND (:job_id IS NULL OR job_id = :job_id)
ORDER BY id
LIMIT :limit

-- ------------------------------------------------------------------------------------ reads

-- name: get
SELECT seq, id, task, queue, payload, options, state, priority, attempts, max_attempts,
    lost_leases, max_lost_leases, enqueued_ms, run_at_ms, started_ms, finished_ms, progress,
    description, result, error, traceback, failure_reason, dedup_key, lease_token,
    lease_expires_ms, worker_id
FROM jobs WHERE id = :id

-- name: list_jobs
-- Newest first by seq; :before is the seq cursor of the previous page (NULL for the first page);
-- :states is a JSON array or NULL.
SELECT seq, id, task, queue, payload, options, state, priority, attempts, max_attempts,
    lost_leases, max_lost_leases, enqueued_ms, run_at_ms, started_ms, finished_ms, progress,
    description, result, error, traceback, failure_reason, dedup_key, lease_token,
    lease_expires_ms, worker_id
FROM jobs
WHERE (:queue IS NULL OR queue = :queue)
    AND (:states IS NULL OR state IN (SELECT value FROM json_each(:states)))
    AND (:task IS NULL OR task = :task)
    AND (:before IS NULL OR seq < :before)
ORDER BY seq DESC
LIMIT :limit

-- name: ping
SELECT count(*) FROM schema_version

-- name: counts
SELECT queue, state, count(*) FROM jobs GROUP BY queue, state

-- name: counts_of_queue
SELECT state, count(*) FROM jobs WHERE queue = :queue GROUP BY state

-- name: queue_names
SELECT name FROM queues ORDER BY name

-- name: wait_state
-- For wait_for_jobs over :queues (a JSON array): how many of them have a queued job, and the
-- earliest run_at_ms of their scheduled jobs. One correlated lookup per queue keeps both on the
-- partial indexes.
SELECT
    (SELECT count(*) FROM json_each(:queues) AS q
     WHERE EXISTS (SELECT 1 FROM jobs WHERE queue = q.value AND state = 'queued')),
    (SELECT min((SELECT min(run_at_ms) FROM jobs WHERE queue = q.value AND state = 'scheduled'))
     FROM json_each(:queues) AS q)
