-- Helper (needs the queue prelude): the two phases of 'enqueue' (enqueue.lua,
-- index_and_enqueue.lua), so that every job's fate is decided before anything is written.

local INVALID_JOB = -5 -- conveyor.errors.ErrorCode.INVALID_JOB

-- Which jobs are new: a job whose dedup key is held by a live job of the queue (or by an earlier
-- job of this batch) collapses into that job's id. Returns the reply head {0, i, live id, ...}
-- and the positions of the new jobs; or nil and {INVALID_JOB, id} when a new job's id is stored
-- already (or repeated in the batch).
local function decide_enqueue(ids, dkeys)
  local stored = redis.call('HMGET', K_META, unpack(ids))
  local out = { 0 }
  local fresh = {}
  local batch_keys, batch_ids = {}, {}
  for i = 1, #ids do
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
      if batch_ids[id] or stored[i] then return nil, { INVALID_JOB, id } end
      batch_ids[id] = true
      if dkey ~= '' then batch_keys[dkey] = id end
      fresh[#fresh + 1] = i
    end
  end
  return out, fresh
end

-- Store the new jobs (positions `fresh`) with their ready-queue scores and sequence numbers,
-- publish their 'enqueue' events and wake waiters for the queued ones.
local function store_jobs(fresh, scores, seqs, ids, states, dkeys, tasks, records, metas)
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
end
