--[[
  index_and_enqueue: enqueue (enqueue.lua) with its index step (index_jobs.lua) in one call, for
  a server that is not a Cluster node: there the global keys and the queue's keys may meet in
  one script, and a producer pays one round trip per enqueue instead of two. On a Cluster the
  broker runs the two steps instead (their keys live in different slots).

  All or nothing: the index conflicts, the dedup keys and the ids in use are all checked before
  anything is written. A job whose dedup key is held by a live job of the queue is not added
  (its slot in the result holds the live job's id; two jobs of the batch with the same key
  collapse into the first) and gets no index entry. Sequence numbers are allocated for the whole
  batch, as index_jobs does.

  Input:
    KEYS[1..15]  the queue key set (includes/queue.lua); touches jobs, meta, all, the state zsets,
                 dedup, events, notify
    KEYS[16]     {PREFIX}:index    hash  job id -> queue
    KEYS[17]     {PREFIX}:queues   set   queue names
    KEYS[18]     {PREFIX}:seq      string, the sequence counter
    ARGV[1]      now (epoch ms)
    ARGV[2]      event retention
    ARGV[3]      the queue's name
    ARGV[4..10]  the batch, column by column, each a msgpack array with one entry per job:
                 score bases (rank * 2^40 for queued, run_at_ms for scheduled, 0 for pending),
                 ids, states, dedup keys ('' = none), tasks, encoded jobs, meta JSONs; the score
                 is base + seq for queued and pending jobs, the base for scheduled ones
  Events:
    'state' (transition 'enqueue') per added job
  Output:
    {0, i, live id, i, live id, ...} as enqueue.lua; or {-5 (INVALID_JOB), the id already in
    use}; or {-5, the id, the queue it is indexed in} when the id is indexed in another queue
    (the caller then takes the two-step path, which tells a stale index entry from a live one)
]]
-- @include queue
-- @include enqueue_batch

local K_INDEX, K_QUEUES, K_SEQ = KEYS[16], KEYS[17], KEYS[18]
local queue = ARGV[3]
local bases, ids = cmsgpack.unpack(ARGV[4]), cmsgpack.unpack(ARGV[5])
local states, dkeys = cmsgpack.unpack(ARGV[6]), cmsgpack.unpack(ARGV[7])
local tasks, records = cmsgpack.unpack(ARGV[8]), cmsgpack.unpack(ARGV[9])
local metas = cmsgpack.unpack(ARGV[10])

local indexed = redis.call('HMGET', K_INDEX, unpack(ids))
for i, id in ipairs(ids) do
  if indexed[i] and indexed[i] ~= queue then return { INVALID_JOB, id, indexed[i] } end
end
local out, fresh = decide_enqueue(ids, dkeys)
if not out then return fresh end -- {INVALID_JOB, id}

local n = #ids
local first = redis.call('INCRBY', K_SEQ, n) - n + 1
local seqs, scores, index_pairs = {}, {}, {}
for i = 1, n do
  seqs[i] = first + i - 1
  if states[i] == 'scheduled' then scores[i] = bases[i] else scores[i] = bases[i] + seqs[i] end
end
for _, i in ipairs(fresh) do
  index_pairs[#index_pairs + 1] = ids[i]
  index_pairs[#index_pairs + 1] = queue
end
call_many('HSET', K_INDEX, index_pairs)
redis.call('SADD', K_QUEUES, queue)
store_jobs(fresh, scores, seqs, ids, states, dkeys, tasks, records, metas)
return out
