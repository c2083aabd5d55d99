-- Helper (needs the queue prelude): scheduled -> queued for jobs whose run_at_ms has come.
local function promote_due(limit)
  local ids = redis.call('ZRANGEBYSCORE', K_STATE.scheduled, '-inf', NOW, 'LIMIT', 0, limit)
  local promoted = 0
  for _, id in ipairs(ids) do
    local m = load_meta(id)
    if m then
      to_queued(id, m, 'promote_scheduled')
      promoted = promoted + 1
    else
      redis.call('ZREM', K_STATE.scheduled, id) -- an orphan member; never expected
    end
  end
  return promoted
end
