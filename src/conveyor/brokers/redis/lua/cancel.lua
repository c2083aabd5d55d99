--[[
  cancel: stop a live job (pending | queued | scheduled | running -> stopped).

  A running job's lease is revoked at once: its token is cleared, so the worker's extend_lease
  returns False and its late ack is rejected. The dedup key is freed. Nothing is retried.

  Input:
    KEYS[1..15]  the queue key set; touches jobs (read), meta, the live state zsets, stopped,
                 dedup, events
    ARGV[1]      now (epoch ms)
    ARGV[2]      event retention
    ARGV[3]      job id
  Events:
    'state' (transition 'cancel')
  Output:
    {encoded job, meta JSON}, or -1 (JOB_NOT_FOUND), -3 (INVALID_TRANSITION: already finished)
]]
-- @include queue

local id = ARGV[3]
local m = load_meta(id)
if not m then return JOB_NOT_FOUND end
if not LIVE[m.state] then return INVALID_TRANSITION end

m.finished_ms = NOW
clear_lease(m)
move(id, m, 'stopped', NOW)
local encoded = cjson.encode(m)
redis.call('HSET', K_META, id, encoded)
release_dedup(id, m)
emit_state(id, m, 'cancel')
return { redis.call('HGET', K_JOBS, id), encoded }
