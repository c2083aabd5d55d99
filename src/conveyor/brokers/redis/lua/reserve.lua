--[[
  reserve: take up to n due jobs of a queue (queued -> running), by priority then enqueue order.

  Due scheduled jobs are promoted first (scheduled -> queued, transition 'promote_scheduled'), so
  a worker never waits for a separate promoter. Each reserved job gets a lease: token
  ARGV[6] .. ':' .. i (the prefix is random per call), deadline now + lease_ms, started_ms = now.
  When the ready queue is left empty, stale wake-up tokens are dropped. Writes are batched: one
  HMGET/HSET/ZADD for the batch, one XADD per job.

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

local n, lease_ms = tonumber(ARGV[3]), tonumber(ARGV[4])
local worker, prefix = ARGV[5], ARGV[6]
promote_due(tonumber(ARGV[7]))

local popped = redis.call('ZPOPMIN', K_STATE.queued, n)
local out = {}
if #popped > 0 then
  local ids = {}
  for i = 1, #popped, 2 do ids[#ids + 1] = popped[i] end
  local metas = redis.call('HMGET', K_META, unpack(ids))
  local records = redis.call('HMGET', K_JOBS, unpack(ids))
  local deadline = NOW + lease_ms
  local saved, running = {}, {}
  for i, id in ipairs(ids) do
    if metas[i] then -- an orphan member (never expected) is just dropped
      local m = cjson.decode(metas[i])
      m.state = 'running'
      m.lease_token = prefix .. ':' .. i
      m.lease_expires_ms = deadline
      m.started_ms = NOW
      if worker ~= '' then m.worker_id = worker else m.worker_id = nil end
      local encoded = cjson.encode(m)
      saved[#saved + 1] = id
      saved[#saved + 1] = encoded
      running[#running + 1] = deadline
      running[#running + 1] = id
      emit_state(id, m, 'reserve')
      out[#out + 1] = records[i]
      out[#out + 1] = encoded
    end
  end
  call_many('HSET', K_META, saved)
  call_many('ZADD', K_STATE.running, running)
end
if redis.call('ZCARD', K_STATE.queued) == 0 then
  redis.call('DEL', K_NOTIFY)
end
return out
