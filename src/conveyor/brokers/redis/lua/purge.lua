--[[
  purge: delete the named jobs of a queue that are (still) in one of the given states.

  The broker reads candidate ids from the state zsets first and passes them in chunks with their
  log lists, so every key is declared; the state is re-checked here. Running jobs are never
  purged (the broker refuses 'running' before calling).

  Input:
    KEYS[1..15]  the queue key set; touches jobs, meta, results, all, the state zsets, dedup,
                 events, logmeta
    KEYS[16..]   the log list of each job, aligned with ARGV[4..]
    ARGV[1]      now (epoch ms)
    ARGV[2]      event retention
    ARGV[3]      the states to purge, comma-separated
    ARGV[4..]    job ids
  Events:
    'deleted' per job
  Output:
    array of the deleted ids
]]
-- @include queue
-- @include remove

local allowed = {}
for state in string.gmatch(ARGV[3], '[^,]+') do allowed[state] = true end
allowed.running = nil
local out = {}
for b = 4, #ARGV do
  local id = ARGV[b]
  local m = load_meta(id)
  if m and allowed[m.state] then
    remove_job(id, m, KEYS[16 + b - 4], 'purge')
    out[#out + 1] = id
  end
end
return out
