--[[
  dead_letter: move a running job to the dead letters (running -> failed) with the reason, error
  and traceback; charges the attempt, clears the lease and frees the dedup key.

  Input:
    KEYS[1..15]  the queue key set; touches jobs (read), meta, running, failed, dedup, events
    ARGV[1]      now (epoch ms)
    ARGV[2]      event retention
    ARGV[3]      job id
    ARGV[4]      lease token
    ARGV[5]      failure reason (conveyor.job.FailureReason)
    ARGV[6]      error (optional string: '' or '=' .. text)
    ARGV[7]      traceback (optional string)
  Events:
    'state' (transition 'dead_letter', with the error)
  Output:
    {encoded job, meta JSON}, or -1 (JOB_NOT_FOUND), -2 (LEASE_LOST)
]]
-- @include queue

local id, token = ARGV[3], ARGV[4]
local m = load_meta(id)
if not m then return JOB_NOT_FOUND end
if m.state ~= 'running' or m.lease_token ~= token then return LEASE_LOST end

m.attempts = m.attempts + 1
m.failure_reason = ARGV[5]
m.error = opt(ARGV[6])
m.traceback = opt(ARGV[7])
m.finished_ms = NOW
clear_lease(m)
move(id, m, 'failed', NOW)
local encoded = cjson.encode(m)
redis.call('HSET', K_META, id, encoded)
release_dedup(id, m)
emit_state(id, m, 'dead_letter')
return { redis.call('HGET', K_JOBS, id), encoded }
