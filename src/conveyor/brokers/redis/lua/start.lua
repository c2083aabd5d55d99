--[[
  start: release a held job (pending -> queued, or scheduled if its run_at_ms is in the future).

  Input:
    KEYS[1..15]  the queue key set; touches jobs (read), meta, pending, queued, scheduled, events,
                 notify
    ARGV[1]      now (epoch ms)
    ARGV[2]      event retention
    ARGV[3]      job id
  Events:
    'state' (transition 'start')
  Output:
    {encoded job, meta JSON}, or -1 (JOB_NOT_FOUND), -3 (INVALID_TRANSITION: not pending)
]]
-- @include queue

local id = ARGV[3]
local m = load_meta(id)
if not m then return JOB_NOT_FOUND end
if m.state ~= 'pending' then return INVALID_TRANSITION end

if m.run_at_ms > NOW then
  move(id, m, 'scheduled', m.run_at_ms)
  save_meta(id, m)
  emit_state(id, m, 'start')
else
  to_queued(id, m, 'start')
  notify(1)
end
return { redis.call('HGET', K_JOBS, id), redis.call('HGET', K_META, id) }
