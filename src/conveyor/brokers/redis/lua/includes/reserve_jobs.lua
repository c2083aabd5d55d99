-- Helper (needs the queue and promote includes): the body of 'reserve' (reserve.lua,
-- ack_and_reserve.lua). Promotes up to `promote_limit` due scheduled jobs, then takes up to `n`
-- queued jobs by priority then enqueue order (queued -> running). Each gets a lease: token
-- `prefix` .. ':' .. i, deadline NOW + lease_ms, started_ms = NOW. When the ready queue is left
-- empty, stale wake-up tokens are dropped. Writes are batched: one HMGET/HSET/ZADD for the batch,
-- one XADD per job. Returns the flat array {encoded job, meta JSON, ...} of the reserved jobs.
local function reserve_jobs(n, lease_ms, worker, prefix, promote_limit)
  promote_due(promote_limit)
  local out = {}
  if n > 0 then
    local popped = redis.call('ZPOPMIN', K_STATE.queued, n)
    if #popped < 2 * n or redis.call('ZCARD', K_STATE.queued) == 0 then
      redis.call('DEL', K_NOTIFY)
    end
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
  end
  return out
end
