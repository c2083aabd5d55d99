--[[
  Shared prelude of every per-queue script (spliced in by scripts.py at "-- @include queue").

  KEYS (the queue key set, conveyor.brokers.redis.keys.QueueKeys.script_keys; all share the hash
  tag {PREFIX:QUEUE}, so a queue lives in one Cluster slot):
    KEYS[1]  jobs        hash   id -> encoded job (immutable part)
    KEYS[2]  meta        hash   id -> mutable fields as JSON (cjson)
    KEYS[3]  results     hash   id -> encoded result
    KEYS[4]  all         zset   id by sequence number
    KEYS[5]  pending     zset   id by sequence number
    KEYS[6]  queued      zset   id by rank * 2^40 + sequence (the ready queue)
    KEYS[7]  scheduled   zset   id by run_at_ms
    KEYS[8]  running     zset   id by lease deadline
    KEYS[9]  completed   zset   id by finished_ms
    KEYS[10] failed      zset   id by finished_ms
    KEYS[11] stopped     zset   id by finished_ms
    KEYS[12] dedup       hash   dedup key -> live job id
    KEYS[13] events      stream job events (MAXLEN ~ retention)
    KEYS[14] notify      list   wake-up tokens for BLPOP waiters
    KEYS[15] logmeta     hash   id -> dropped log line count
    KEYS[16..]           per-job log lists, only for scripts that say so
  ARGV (common head):
    ARGV[1]  now, epoch ms (the broker's clock; scripts never read the server's time)
    ARGV[2]  event retention (approximate stream length)
  Optional strings travel as '' (none) or '=' .. value, so that '' stays a real value. Batches
  travel as one msgpack-encoded ARGV (cmsgpack), which costs far less to send than many args.
]]
local K_JOBS, K_META, K_RESULTS, K_ALL = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local K_STATE = {
  pending = KEYS[5], queued = KEYS[6], scheduled = KEYS[7], running = KEYS[8],
  completed = KEYS[9], failed = KEYS[10], stopped = KEYS[11],
}
local K_DEDUP, K_EVENTS, K_NOTIFY, K_LOGMETA = KEYS[12], KEYS[13], KEYS[14], KEYS[15]
local NOW = tonumber(ARGV[1])
local RETENTION = ARGV[2]

-- Error codes: conveyor.errors.ErrorCode.
local JOB_NOT_FOUND, LEASE_LOST, INVALID_TRANSITION = -1, -2, -3

local RANK_SPAN = 1099511627776 -- 2^40: sequence numbers stay below it
local NOTIFY_CAP = 64 -- wake at most this many waiters per call; older tokens are trimmed
local FINISHED = { completed = true, failed = true, stopped = true }
local LIVE = { pending = true, queued = true, scheduled = true, running = true }

-- Run `cmd key args...` in slices, so a big batch never exceeds Lua's unpack() limit.
-- The slice length is even, so field/value and score/member pairs stay together.
local function call_many(cmd, key, args)
  local n = #args
  local i = 1
  while i <= n do
    local j = math.min(i + 3999, n)
    redis.call(cmd, key, unpack(args, i, j))
    i = j + 1
  end
end

local function opt(s)
  if s == nil or s == '' then return nil end
  return string.sub(s, 2)
end

local function load_meta(id)
  local raw = redis.call('HGET', K_META, id)
  if not raw then return nil end
  return cjson.decode(raw)
end

local function save_meta(id, m)
  redis.call('HSET', K_META, id, cjson.encode(m))
end

-- The ready-queue score: priority rank, then the sequence number (kept as the job's score in
-- K_ALL, so the meta need not carry it and enqueue can build metas before seqs are allocated).
local function ready_score(id, m)
  return m.rank * RANK_SPAN + tonumber(redis.call('ZSCORE', K_ALL, id))
end

-- Move a job between state zsets and record the new state (the caller saves the meta).
local function move(id, m, state, score)
  redis.call('ZREM', K_STATE[m.state], id)
  redis.call('ZADD', K_STATE[state], score, id)
  m.state = state
end

local function clear_lease(m)
  m.lease_token = nil
  m.lease_expires_ms = nil
end

-- A finished job gives its dedup key back, unless another live job took it meanwhile.
local function release_dedup(id, m)
  if m.dedup_key and redis.call('HGET', K_DEDUP, m.dedup_key) == id then
    redis.call('HDEL', K_DEDUP, m.dedup_key)
  end
end

-- A job coming back to life (redrive) claims its dedup key again if it is free (or held by a
-- job that is gone or finished: a stale entry). If another live job holds it, the job drops its
-- claim (m.dedup_key = nil): it runs, but never as the key's holder, so one key keeps at most
-- one live job.
local function claim_dedup(id, m)
  if m.dedup_key and redis.call('HSETNX', K_DEDUP, m.dedup_key, id) == 0 then
    local holder = redis.call('HGET', K_DEDUP, m.dedup_key)
    if holder ~= id then
      local held = load_meta(holder)
      if held and LIVE[held.state] then
        m.dedup_key = nil
      else
        redis.call('HSET', K_DEDUP, m.dedup_key, id) -- a stale entry: take it over
      end
    end
  end
end

-- Event ids are "<server time in microseconds>-<n>", never below the stream's last id: scripts
-- run one at a time, so ids of different queues' streams are ordered too and a cursor taken
-- from one stream is a valid position in every other (a subscriber follows many with one id).
-- The first event of a call asks for "<TIME in us>-*" and trims the stream (MAXLEN ~, cheaper
-- than on every XADD; the stream may exceed the retention by one call's events); the rest of
-- the call's events reuse that id base. Only if the server clock went back behind the stream's
-- last id (XADD refuses the id) is that id read, and the call continues after it. The common
-- path is thus TIME plus the XADDs: every extra command is paid on the worker's critical path.
local event_base = nil
local function emit_first(kind, id, ...)
  local t = redis.call('TIME')
  local base = string.format('%.0f', tonumber(t[1]) * 1000000 + tonumber(t[2])) .. '-*'
  local added = redis.pcall(
    'XADD', K_EVENTS, 'MAXLEN', '~', RETENTION, base, 'k', kind, 'j', id, 'ts', NOW, ...)
  if type(added) == 'table' and added.err then
    local last = redis.call('XREVRANGE', K_EVENTS, '+', '-', 'COUNT', 1)[1]
    base = string.match(last[1], '^(%d+)') .. '-*'
    redis.call('XADD', K_EVENTS, 'MAXLEN', '~', RETENTION, base, 'k', kind, 'j', id, 'ts', NOW, ...)
  end
  event_base = base
end

-- Publish one event (field/value pairs after the common ones).
local function emit(kind, id, ...)
  if event_base then
    redis.call('XADD', K_EVENTS, event_base, 'k', kind, 'j', id, 'ts', NOW, ...)
  else
    emit_first(kind, id, ...)
  end
end

-- Publish a 'state' event for a job that just entered m.state through `transition`.
local function emit_state(id, m, transition)
  if m.error then
    emit('state', id, 's', m.state, 'x', transition, 't', m.task, 'a', m.attempts, 'e', m.error)
  else
    emit('state', id, 's', m.state, 'x', transition, 't', m.task, 'a', m.attempts)
  end
end

-- Wake up to `n` waiters of wait_for_jobs (BLPOP on K_NOTIFY).
local function notify(n)
  if n <= 0 then return end
  if n > NOTIFY_CAP then n = NOTIFY_CAP end
  local tokens = {}
  for i = 1, n do tokens[i] = '1' end
  redis.call('LPUSH', K_NOTIFY, unpack(tokens))
  redis.call('LTRIM', K_NOTIFY, 0, NOTIFY_CAP - 1)
end

-- Put a job in the ready queue at its original place (priority, then enqueue order).
local function to_queued(id, m, transition)
  move(id, m, 'queued', ready_score(id, m))
  save_meta(id, m)
  emit_state(id, m, transition)
end
