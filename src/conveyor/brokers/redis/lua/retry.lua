--[[
  retry: record a failed run and schedule the next one (running -> scheduled, or queued when
  run_at_ms has already come); charges the attempt and clears the lease.

  The job keeps its sequence number, so once due it is reserved in its original enqueue order.

  Input:
    KEYS[1..15]  the queue key set; touches jobs (read), meta, running, scheduled, queued,
                 events, notify
    ARGV[1]      now (epoch ms)
    ARGV[2]      event retention
    ARGV[3]      job id
    ARGV[4]      lease token
    ARGV[5]      run_at_ms of the next attempt
    ARGV[6]      error (optional string: '' or '=' .. text)
    ARGV[7]      traceback (optional string)
  Events:
    'state' (transition 'retry', with the error)
  Output:
    {encoded job, meta JSON}, or -1 (JOB_NOT_FOUND), -2 (LEASE_LOST)
]]
-- @include queue

local id, token, run_at = ARGV[3], ARGV[4], tonumber(ARGV[5])
local m = load_meta(id)
if not m then return JOB_NOT_FOUND end
if m.state ~= 'running' or m.lease_token ~= token then return LEASE_LOST end

m.attempts = m.attempts + 1
m.run_at_ms = run_at
m.error = opt(ARGV[6])
m.traceback = opt(ARGV[7])
clear_lease(m)
if run_at <= NOW then
  to_queued(id, m, 'retry')
  notify(1)
else
  move(id, m, 'scheduled', run_at)
  save_meta(id, m)
  emit_state(id, m, 'retry')
end
return { redis.call('HGET', K_JOBS, id), redis.call('HGET', K_META, id) }
