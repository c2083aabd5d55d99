--[[
  reserve: take up to n due jobs of a queue (queued -> running), by priority then enqueue order.

  Due scheduled jobs are promoted first (scheduled -> queued, transition 'promote_scheduled'), so
  a worker never waits for a separate promoter. Each reserved job gets a lease: token
  ARGV[6] .. ':' .. i (the prefix is random per call), deadline now + lease_ms, started_ms = now.
  When the ready queue is left empty, stale wake-up tokens are dropped. Writes are batched: one
  HMGET/HSET/ZADD for the batch, one XADD per job (includes/reserve_jobs.lua).

  Input:
    KEYS[1..15]  the queue key set; touches jobs (read), meta, queued, scheduled, running, events,
                 notify
    ARGV[1]      now (epoch ms)
    ARGV[2]      event retention
    ARGV[3]      n, the most jobs to take (<= 1000)
    ARGV[4]      lease length, ms
    ARGV[5]      worker id ('' = none)
    ARGV[6]      lease token prefix
    ARGV[7]      the most scheduled jobs to promote first
  Events:
    'state' (transition 'promote_scheduled') per promoted job, 'state' (transition 'reserve')
    per reserved job
  Output:
    flat array: encoded job, meta JSON, for each reserved job
]]
-- @include queue
-- @include promote
-- @include reserve_jobs

return reserve_jobs(tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5], ARGV[6], tonumber(ARGV[7]))
