--[[
  ack: finish running jobs with their results (running -> completed); charges the attempt.

  Each item is checked on its own: a job that is gone returns JOB_NOT_FOUND, a token that is not
  the job's current one (expired and re-delivered, cancelled, already finished, or acked earlier
  in this batch) LEASE_LOST, and nothing changes for that item. Writes are batched: one
  HMGET/HSET/ZREM/ZADD for the batch, one XADD per acked job (includes/ack_items.lua).

  Input:
    KEYS[1..15]  the queue key set; touches meta, results, running, completed, dedup, events
    ARGV[1]      now (epoch ms)
    ARGV[2]      event retention
    ARGV[3]      msgpack array of items, each [job id, lease token, encoded result ('' = none)]
  Events:
    'state' (transition 'ack') per acked job
  Output:
    array with, per item, 1 (acked), -1 (JOB_NOT_FOUND) or -2 (LEASE_LOST)
]]
-- @include queue
-- @include ack_items

return ack_items(cmsgpack.unpack(ARGV[3]))
