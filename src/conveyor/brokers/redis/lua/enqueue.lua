--[[
  enqueue: add a batch of validated jobs to one queue (new -> pending | queued | scheduled).

  All or nothing: every job's fate is decided before anything is written. A job whose dedup key
  is held by a live job of the queue is not added; its slot in the result holds the live job's
  id, and two jobs of the batch with the same key collapse into the first. Otherwise a job whose
  id is already stored (or repeated in the batch) refuses the whole batch. Writes are batched:
  one HSET/ZADD per key for the whole batch, one XADD per job.

  Input:
    KEYS[1..15]  the queue key set (includes/queue.lua); touches jobs, meta, all, the state zsets,
                 dedup, events, notify
    ARGV[1]      now (epoch ms)
    ARGV[2]      event retention
    ARGV[3..10]  the batch, column by column, each a msgpack array with one entry per job
                 (columns unpack faster than rows of tuples): scores, sequence numbers, ids,
                 states, dedup keys ('' = none), tasks, encoded jobs, meta JSONs; the score is
                 the seq for pending, run_at_ms for scheduled and rank * 2^40 + seq for queued
  Events:
    'state' (transition 'enqueue') per added job
  Output:
    {0, i, live id, i, live id, ...}: the 1-based positions of deduplicated jobs and the id each
    collapsed into (every other job was stored under its own id); or {-5 (INVALID_JOB), the id
    already in use}
]]
-- @include queue
-- @include enqueue_batch

local scores, seqs = cmsgpack.unpack(ARGV[3]), cmsgpack.unpack(ARGV[4])
local ids, states = cmsgpack.unpack(ARGV[5]), cmsgpack.unpack(ARGV[6])
local dkeys, tasks = cmsgpack.unpack(ARGV[7]), cmsgpack.unpack(ARGV[8])
local records, metas = cmsgpack.unpack(ARGV[9]), cmsgpack.unpack(ARGV[10])

local out, fresh = decide_enqueue(ids, dkeys)
if not out then return fresh end -- {INVALID_JOB, id}
store_jobs(fresh, scores, seqs, ids, states, dkeys, tasks, records, metas)
return out
