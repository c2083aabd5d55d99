--[[
  requeue_expired: recover running jobs whose lease deadline has passed (their worker died).

  Each charges an attempt and a lost lease and loses its token (the dead worker's late ack is
  rejected). It goes to failed with reason 'poison' once lost_leases reaches max_lost_leases,
  with reason 'exhausted' once attempts reaches max_attempts, else back to queued at once at its
  original place (running -> queued | failed).

  Input:
    KEYS[1..15]  the queue key set; touches meta, running, queued, failed, dedup, events, notify
    ARGV[1]      now (epoch ms); a deadline has passed when it is < now
    ARGV[2]      event retention
    ARGV[3]      the most jobs to recover
  Events:
    'state' (transition 'requeue_expired') per job
  Output:
    {requeued ids, dead-lettered ids}
]]
-- @include queue

local ids = redis.call('ZRANGEBYSCORE', K_STATE.running, '-inf', '(' .. NOW, 'LIMIT', 0,
  tonumber(ARGV[3]))
local requeued, dead = {}, {}
for _, id in ipairs(ids) do
  local m = load_meta(id)
  if not m then
    redis.call('ZREM', K_STATE.running, id) -- an orphan member; never expected
  else
    m.attempts = m.attempts + 1
    m.lost_leases = m.lost_leases + 1
    clear_lease(m)
    local reason = nil
    if m.lost_leases >= m.max_lost_leases then
      reason = 'poison'
    elseif m.attempts >= m.max_attempts then
      reason = 'exhausted'
    end
    if reason then
      m.failure_reason = reason
      m.error = "the job's lease expired " .. m.lost_leases .. ' time(s): its worker died or stalled'
      m.finished_ms = NOW
      move(id, m, 'failed', NOW)
      save_meta(id, m)
      release_dedup(id, m)
      emit_state(id, m, 'requeue_expired')
      dead[#dead + 1] = id
    else
      to_queued(id, m, 'requeue_expired')
      requeued[#requeued + 1] = id
    end
  end
end
notify(#requeued)
return { requeued, dead }
