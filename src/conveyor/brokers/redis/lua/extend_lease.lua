--[[
  extend_lease: push the deadline of held leases to now + lease_ms (running -> running).

  A lease is held while the job exists, is running and still carries the presented token.

  Input:
    KEYS[1..15]  the queue key set; touches meta, running
    ARGV[1]      now (epoch ms)
    ARGV[2]      event retention (unused: extending a lease is not an event)
    ARGV[3]      lease length, ms
    ARGV[4]      msgpack array of leases, each [job id, lease token]
  Events:
    none
  Output:
    array with, per lease, 1 (extended) or 0 (no longer held)
]]
-- @include queue

local deadline = NOW + tonumber(ARGV[3])
local leases = cmsgpack.unpack(ARGV[4])
local ids = {}
for i, lease in ipairs(leases) do ids[i] = lease[1] end
local metas = redis.call('HMGET', K_META, unpack(ids))
local out, saved, running = {}, {}, {}
for i, lease in ipairs(leases) do
  out[i] = 0
  if metas[i] then
    local m = cjson.decode(metas[i])
    if m.state == 'running' and m.lease_token == lease[2] then
      m.lease_expires_ms = deadline
      saved[#saved + 1] = lease[1]
      saved[#saved + 1] = cjson.encode(m)
      running[#running + 1] = deadline
      running[#running + 1] = lease[1]
      out[i] = 1
    end
  end
end
call_many('HSET', K_META, saved)
call_many('ZADD', K_STATE.running, running)
return out
