-- Helper (needs the queue prelude): the body of 'ack' (ack.lua, ack_and_reserve.lua).
-- `items` is a list of {job id, lease token, encoded result ('' = none)}; returns, per item,
-- 1 (acked), JOB_NOT_FOUND or LEASE_LOST. Each item is checked on its own: a job that is gone,
-- or a token that is not the job's current one (expired and re-delivered, cancelled, already
-- finished, or acked earlier in this batch) changes nothing for that item. Writes are batched:
-- one HMGET/HSET/ZREM/ZADD for the batch, one XADD per acked job.
local function ack_items(items)
  local ids = {}
  for i, item in ipairs(items) do ids[i] = item[1] end
  local metas = redis.call('HMGET', K_META, unpack(ids))
  local out, done = {}, {}
  local saved, finished, completed, results = {}, {}, {}, {}
  for i, item in ipairs(items) do
    local id = item[1]
    if not metas[i] then
      out[i] = JOB_NOT_FOUND
    else
      local m = cjson.decode(metas[i])
      if done[id] or m.state ~= 'running' or m.lease_token ~= item[2] then
        out[i] = LEASE_LOST
      else
        done[id] = true
        m.attempts = m.attempts + 1
        m.finished_ms = NOW
        clear_lease(m)
        m.state = 'completed'
        saved[#saved + 1] = id
        saved[#saved + 1] = cjson.encode(m)
        finished[#finished + 1] = id
        completed[#completed + 1] = NOW
        completed[#completed + 1] = id
        if item[3] ~= '' then
          results[#results + 1] = id
          results[#results + 1] = item[3]
        end
        release_dedup(id, m)
        emit_state(id, m, 'ack')
        out[i] = 1
      end
    end
  end
  call_many('HSET', K_META, saved)
  call_many('ZREM', K_STATE.running, finished)
  call_many('ZADD', K_STATE.completed, completed)
  call_many('HSET', K_RESULTS, results)
  return out
end
