--[[
  redrive: put dead letters back to work (failed, or stopped when named by id -> queued).

  Attempts, lost leases, error, traceback, failure reason, finished_ms and the result are reset
  (a repeated id counts once: the second sight finds it queued); the job
  takes its original place (priority, then enqueue order) and claims its dedup key again if it
  is free; if another live job holds the key, the job is re-driven without it (its dedup_key is
  dropped), so nothing is skipped and one key keeps at most one live job. Ids that are gone or
  in another state are skipped.

  Input:
    KEYS[1..15]  the queue key set; touches meta, results, failed, stopped, queued, dedup, events, notify
    ARGV[1]      now (epoch ms)
    ARGV[2]      event retention
    ARGV[3]      '1' when stopped jobs may be re-driven too (ids were named), else '0'
    ARGV[4..]    job ids
  Events:
    'state' (transition 'redrive') per job
  Output:
    the number of re-driven jobs
]]
-- @include queue

local with_stopped = ARGV[3] == '1'
local count = 0
for b = 4, #ARGV do
  local id = ARGV[b]
  local m = load_meta(id)
  if m and (m.state == 'failed' or (with_stopped and m.state == 'stopped')) then
    redis.call('HDEL', K_RESULTS, id)
    m.attempts = 0
    m.lost_leases = 0
    m.error = nil
    m.traceback = nil
    m.failure_reason = nil
    m.finished_ms = nil
    claim_dedup(id, m)
    to_queued(id, m, 'redrive')
    count = count + 1
  end
end
notify(count)
return count
