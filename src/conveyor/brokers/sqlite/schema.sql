-- conveyor SQLite schema, version 1 (see SCHEMA_VERSION in connection.py).
--
-- Applied once, inside one BEGIN IMMEDIATE transaction, when a file has no schema yet. A file whose
-- schema_version row is newer than this conveyor knows is refused before anything is written.
--
-- Hot-path indexes are partial (WHERE state = ...) so that the ever-growing pile of finished jobs
-- never enters the indexes that reserve, promote and requeue_expired walk.

CREATE TABLE schema_version (
    version INTEGER NOT NULL
);

-- Facts fixed when the file is created; checked on every connect (a msgpack broker must not
-- decode a JSON file's payloads).
CREATE TABLE settings (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;

-- Queue names ever used, so that queues() and counts() still list a queue after its jobs are gone.
CREATE TABLE queues (
    name TEXT PRIMARY KEY
) WITHOUT ROWID;

CREATE TABLE jobs (
    -- AUTOINCREMENT: seq never goes backwards, even after the newest job is deleted, so it is both
    -- the FIFO order within a priority and the stable "newest first" order of list_jobs.
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    queue TEXT NOT NULL,
    task TEXT NOT NULL,
    -- args and kwargs, encoded by the broker's codec (json or msgpack); never read by SQL.
    payload BLOB NOT NULL,
    -- timeout_s, retry, on_success, on_failure as JSON, or NULL when all are unset.
    options TEXT,
    state TEXT NOT NULL,
    priority INTEGER NOT NULL,  -- Priority.rank: 0 high, 1 normal, 2 low
    attempts INTEGER NOT NULL DEFAULT 0,
    max_attempts INTEGER NOT NULL,
    lost_leases INTEGER NOT NULL DEFAULT 0,
    max_lost_leases INTEGER NOT NULL,
    enqueued_ms INTEGER NOT NULL,
    run_at_ms INTEGER NOT NULL,
    started_ms INTEGER,
    finished_ms INTEGER,
    progress INTEGER NOT NULL DEFAULT 0,
    description TEXT NOT NULL DEFAULT '',
    result BLOB,  -- encoded by the codec; NULL means None
    error TEXT,
    traceback TEXT,
    failure_reason TEXT,
    dedup_key TEXT,
    lease_token TEXT,
    lease_expires_ms INTEGER,
    worker_id TEXT,
    log_total INTEGER NOT NULL DEFAULT 0  -- log lines ever appended (kept + dropped)
);

-- reserve: the next queued jobs of a queue by (priority, seq), read in index order without a sort.
CREATE INDEX jobs_reserve ON jobs (queue, priority, seq) WHERE state = 'queued';
-- promote_scheduled and wait_for_jobs: the due (or earliest) scheduled jobs of a queue.
CREATE INDEX jobs_scheduled ON jobs (queue, run_at_ms) WHERE state = 'scheduled';
-- requeue_expired: running jobs of a queue by lease deadline.
CREATE INDEX jobs_expiry ON jobs (queue, lease_expires_ms) WHERE state = 'running';
-- dedup: at most one live job per (queue, dedup_key); finished jobs free the key.
CREATE UNIQUE INDEX jobs_dedup ON jobs (queue, dedup_key)
    WHERE dedup_key IS NOT NULL AND state IN ('pending', 'queued', 'scheduled', 'running');
-- counts, purge, redrive, and list_jobs filtered by queue (rowid = seq is the implicit last column).
CREATE INDEX jobs_queue_state ON jobs (queue, state);
-- cleanup: finished jobs by finish time.
CREATE INDEX jobs_finished ON jobs (finished_ms) WHERE state IN ('completed', 'failed', 'stopped');

-- Kept log lines; n counts from 0 per job, so dropped = log_total - (lines kept).
CREATE TABLE logs (
    job_id TEXT NOT NULL,
    n INTEGER NOT NULL,
    line TEXT NOT NULL,
    PRIMARY KEY (job_id, n)
) WITHOUT ROWID;

-- The event log read by subscribe. AUTOINCREMENT: the id is the resume cursor and must never be
-- reused, even once the table has been trimmed to its retention.
CREATE TABLE events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    job_id TEXT NOT NULL,
    queue TEXT NOT NULL,
    ts_ms INTEGER NOT NULL,
    state TEXT,
    transition TEXT,
    task TEXT,
    attempts INTEGER,
    progress INTEGER,
    description TEXT,
    line TEXT,
    error TEXT
);
