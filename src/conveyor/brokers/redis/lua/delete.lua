--[[
  delete: remove one job in any state, with its result and logs (a running job's lease goes with
  it, so its worker's next call gets LEASE_LOST or JOB_NOT_FOUND).

  The caller deletes the job's entry in the global index afterwards.

  Input:
    KEYS[1..15]  the queue key set; touches jobs, meta, results, all, the job's state zset, dedup,
                 events, logmeta
    KEYS[16]     the job's log list
    ARGV[1]      now (epoch ms)
    ARGV[2]      event retention
    ARGV[3]      job id
  Events:
    'deleted' (transition 'delete')
  Output:
    1, or -1 (JOB_NOT_FOUND)
]]
-- @include queue
-- @include remove

local id = ARGV[3]
local m = load_meta(id)
if not m then return JOB_NOT_FOUND end
remove_job(id, m, KEYS[16], 'delete')
return 1
