--[[
  cleanup: delete the named finished jobs (completed, failed, stopped) whose finished_ms is before
  the cutoff.

  The broker reads candidate ids from the finished zsets by score first and passes them in chunks
  with their log lists, so every key is declared; state and age are re-checked here.

  Input:
    KEYS[1..15]  the queue key set; touches jobs, meta, results, all, the finished zsets, dedup,
                 events, logmeta
    KEYS[16..]   the log list of each job, aligned with ARGV[4..]
    ARGV[1]      now (epoch ms)
    ARGV[2]      event retention
    ARGV[3]      cutoff, epoch ms
    ARGV[4..]    job ids
  Events:
    'deleted' per job
  Output:
    array of the deleted ids
]]
-- @include queue
-- @include remove

local cutoff = tonumber(ARGV[3])
local out = {}
for b = 4, #ARGV do
  local id = ARGV[b]
  local m = load_meta(id)
  if m and FINISHED[m.state] and m.finished_ms and m.finished_ms < cutoff then
    remove_job(id, m, KEYS[16 + b - 4], 'cleanup')
    out[#out + 1] = id
  end
end
return out
