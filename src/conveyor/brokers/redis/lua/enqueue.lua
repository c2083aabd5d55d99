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

local INVALID_JOB = -5
local scores, seqs = cmsgpack.unpack(ARGV[3]), cmsgpack.unpack(ARGV[4])
local ids, states = cmsgpack.unpack(ARGV[5]), cmsgpack.unpack(ARGV[6])
local dkeys, tasks = cmsgpack.unpack(ARGV[7]), cmsgpack.unpack(ARGV[8])
local records, metas = cmsgpack.unpack(ARGV[9]), cmsgpack.unpack(ARGV[10])
local n = #ids
local stored = redis.call('HMGET', K_META, unpack(ids))

local out = { 0 }
local fresh = {}
local batch_keys, batch_ids = {}, {}
for i = 1, n do
  local id, dkey = ids[i], dkeys[i]
  local live = nil
  if dkey ~= '' then
    live = batch_keys[dkey]
    if not live then
      live = redis.call('HGET', K_DEDUP, dkey)
      if live then
        local held = load_meta(live)
        if not held or not LIVE[held.state] then live = nil end -- a stale entry
      end
    end
  end
  if live then
    out[#out + 1] = i
    out[#out + 1] = live
  else
    if batch_ids[id] or stored[i] then return { INVALID_JOB, id } end
    batch_ids[id] = true
    if dkey ~= '' then batch_keys[dkey] = id end
    fresh[#fresh + 1] = i
  end
end

local record_pairs, meta_pairs, all = {}, {}, {}
local by_state = { pending = {}, queued = {}, scheduled = {} }
local ready = 0
for _, i in ipairs(fresh) do
  local id, state = ids[i], states[i]
  record_pairs[#record_pairs + 1] = id
  record_pairs[#record_pairs + 1] = records[i]
  meta_pairs[#meta_pairs + 1] = id
  meta_pairs[#meta_pairs + 1] = metas[i]
  all[#all + 1] = seqs[i]
  all[#all + 1] = id
  local zs = by_state[state]
  zs[#zs + 1] = scores[i]
  zs[#zs + 1] = id
  if dkeys[i] ~= '' then redis.call('HSET', K_DEDUP, dkeys[i], id) end
  if state == 'queued' then ready = ready + 1 end
end
call_many('HSET', K_JOBS, record_pairs)
call_many('HSET', K_META, meta_pairs)
call_many('ZADD', K_ALL, all)
for state, zs in pairs(by_state) do call_many('ZADD', K_STATE[state], zs) end
for _, i in ipairs(fresh) do
  emit('state', ids[i], 's', states[i], 'x', 'enqueue', 't', tasks[i], 'a', 0)
end
notify(ready)
return out
