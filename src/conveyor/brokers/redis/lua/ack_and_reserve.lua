--[[
  ack_and_reserve: a worker's "finish and take next": ack (as ack.lua), then reserve (as
  reserve.lua), in one call on the queue's slot, so refilling the slots of finished jobs costs
  one round trip. Fencing and events are exactly those of the two transitions.

  Input:
    KEYS[1..15]  the queue key set; touches jobs (read), meta, results, queued, scheduled,
                 running, completed, dedup, events, notify
    ARGV[1]      now (epoch ms)
    ARGV[2]      event retention
    ARGV[3]      msgpack array of ack items, each [job id, lease token, encoded result ('' = none)]
                 (may be empty)
    ARGV[4]      n, the most jobs to reserve (<= 1000; 0 = ack only)
    ARGV[5]      lease length, ms
    ARGV[6]      worker id ('' = none)
    ARGV[7]      lease token prefix
    ARGV[8]      the most scheduled jobs to promote first
  Events:
    'state' (transition 'ack') per acked job, then those of reserve
  Output:
    {ack codes (as ack.lua), flat reserved jobs (as reserve.lua)}
]]
-- @include queue
-- @include promote
-- @include ack_items
-- @include reserve_jobs

local items = cmsgpack.unpack(ARGV[3])
local acked = {}
if #items > 0 then acked = ack_items(items) end
local reserved = reserve_jobs(tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6], ARGV[7],
  tonumber(ARGV[8]))
return { acked, reserved }
