--[[
  append_log: append lines to a job's log, keeping the newest max_lines and counting the rest.

  The lease token is not checked: lines from a job's last moments are kept even if it was just
  cancelled. The job must exist.

  Input:
    KEYS[1..15]  the queue key set; touches meta (read), events, logmeta
    KEYS[16]     the job's log list
    ARGV[1]      now (epoch ms)
    ARGV[2]      event retention
    ARGV[3]      job id
    ARGV[4]      max_lines kept
    ARGV[5]      lines the caller already dropped (older than these; counted, never stored)
    ARGV[6..]    lines
  Events:
    'log' per line
  Output:
    1, or -1 (JOB_NOT_FOUND)
]]
-- @include queue

local id, max_lines = ARGV[3], tonumber(ARGV[4])
if redis.call('HEXISTS', K_META, id) == 0 then return JOB_NOT_FOUND end
local log_key = KEYS[16]
local upstream = tonumber(ARGV[5])
if upstream > 0 then redis.call('HINCRBY', K_LOGMETA, id, upstream) end
for b = 6, #ARGV do
  redis.call('RPUSH', log_key, ARGV[b])
  emit('log', id, 'l', ARGV[b])
end
local excess = redis.call('LLEN', log_key) - max_lines
if excess > 0 then
  redis.call('LTRIM', log_key, excess, -1)
  redis.call('HINCRBY', K_LOGMETA, id, excess)
end
return 1
