--[[
  release: give a running job back without charging an attempt (running -> queued at once).

  Used by a worker's graceful shutdown. The job keeps its sequence number, so it returns to its
  original place: priority first, then enqueue order.

  Input:
    KEYS[1..15]  the queue key set; touches jobs (read), meta, running, queued, events, notify
    ARGV[1]      now (epoch ms)
    ARGV[2]      event retention
    ARGV[3]      job id
    ARGV[4]      lease token
  Events:
    'state' (transition 'release')
  Output:
    {encoded job, meta JSON}, or -1 (JOB_NOT_FOUND), -2 (LEASE_LOST)
]]
-- @include queue

local id, token = ARGV[3], ARGV[4]
local m = load_meta(id)
if not m then return JOB_NOT_FOUND end
if m.state ~= 'running' or m.lease_token ~= token then return LEASE_LOST end

clear_lease(m)
to_queued(id, m, 'release')
notify(1)
return { redis.call('HGET', K_JOBS, id), redis.call('HGET', K_META, id) }
