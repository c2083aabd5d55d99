--[[
  index_jobs: the first step of enqueue, on the global keys: record which queue each job id
  lives in, register the queues, and allocate sequence numbers for the batch.

  Runs before the per-queue enqueue script, so a crash in between leaves at most index entries
  that point at no job (they read as "not found"). An id indexed in another queue (or given for
  two queues in this batch) is a conflict and nothing is written. Ids already indexed in the
  same queue are reported, so the caller knows which entries it created (and must remove if the
  queue refuses or deduplicates the job).

  Input:
    KEYS[1]      {PREFIX}:index    hash  job id -> queue
    KEYS[2]      {PREFIX}:queues   set   queue names
    KEYS[3]      {PREFIX}:seq      string, the sequence counter
    ARGV[1]      msgpack array of job ids
    ARGV[2]      msgpack array of their queues (same length)
  Events:
    none
  Output:
    {0, first sequence number of the batch, ids that were already indexed...}, or
    {-5 (INVALID_JOB), the conflicting id, the queue it is indexed in ('' = this batch)}
]]
local K_INDEX, K_QUEUES, K_SEQ = KEYS[1], KEYS[2], KEYS[3]
local INVALID_JOB = -5

local ids = cmsgpack.unpack(ARGV[1])
local queues = cmsgpack.unpack(ARGV[2])
local indexed = redis.call('HMGET', K_INDEX, unpack(ids))
local batch, existing, names = {}, {}, {}
local pairs_, seen = {}, {}
for i, id in ipairs(ids) do
  local queue = queues[i]
  if batch[id] and batch[id] ~= queue then return { INVALID_JOB, id, '' } end
  batch[id] = queue
  if indexed[i] then
    if indexed[i] ~= queue then return { INVALID_JOB, id, indexed[i] } end
    existing[#existing + 1] = id
  end
  pairs_[#pairs_ + 1] = id
  pairs_[#pairs_ + 1] = queue
  if not seen[queue] then
    seen[queue] = true
    names[#names + 1] = queue
  end
end
for i = 1, #pairs_, 4000 do
  redis.call('HSET', K_INDEX, unpack(pairs_, i, math.min(i + 3999, #pairs_)))
end
redis.call('SADD', K_QUEUES, unpack(names))
local n = #ids
local out = { 0, redis.call('INCRBY', K_SEQ, n) - n + 1 }
for _, id in ipairs(existing) do out[#out + 1] = id end
return out
