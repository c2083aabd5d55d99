--[[
  set_progress: record a running job's progress and/or description (running -> running).

  Input:
    KEYS[1..15]  the queue key set; touches meta, events
    ARGV[1]      now (epoch ms)
    ARGV[2]      event retention
    ARGV[3]      job id
    ARGV[4]      lease token
    ARGV[5]      progress 0-100 ('' = unchanged; the broker clamps it)
    ARGV[6]      description (optional string: '' = unchanged, '=' .. text)
  Events:
    'progress' with the job's progress and description after the change (none when both
    arguments are '')
  Output:
    1, or -1 (JOB_NOT_FOUND), -2 (LEASE_LOST)
]]
-- @include queue

local id, token = ARGV[3], ARGV[4]
local m = load_meta(id)
if not m then return JOB_NOT_FOUND end
if m.state ~= 'running' or m.lease_token ~= token then return LEASE_LOST end

if ARGV[5] == '' and ARGV[6] == '' then return 1 end -- nothing to record: no event either
if ARGV[5] ~= '' then m.progress = tonumber(ARGV[5]) end
local description = opt(ARGV[6])
if description then
  if description == '' then m.description = nil else m.description = description end
end
save_meta(id, m)
emit('progress', id, 'p', m.progress, 'd', m.description or '')
return 1
