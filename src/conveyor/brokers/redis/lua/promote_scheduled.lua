--[[
  promote_scheduled: scheduled -> queued for jobs whose run_at_ms has come (run_at_ms <= now).

  Promoted jobs take their original place (priority, then enqueue order).

  Input:
    KEYS[1..15]  the queue key set; touches meta, scheduled, queued, events, notify
    ARGV[1]      now (epoch ms)
    ARGV[2]      event retention
    ARGV[3]      the most jobs to promote
  Events:
    'state' (transition 'promote_scheduled') per job
  Output:
    the number of promoted jobs
]]
-- @include queue
-- @include promote

local promoted = promote_due(tonumber(ARGV[3]))
notify(promoted)
return promoted
