-- Helper (needs the queue prelude): remove a job and everything it owns, publishing 'deleted'.
-- `log_key` is the job's declared log list (KEYS[16..]); `action` names the cause in the event.
local function remove_job(id, m, log_key, action)
  redis.call('HDEL', K_JOBS, id)
  redis.call('HDEL', K_META, id)
  redis.call('HDEL', K_RESULTS, id)
  redis.call('HDEL', K_LOGMETA, id)
  redis.call('ZREM', K_ALL, id)
  redis.call('ZREM', K_STATE[m.state], id)
  redis.call('DEL', log_key)
  release_dedup(id, m)
  emit('deleted', id, 'x', action, 't', m.task)
end
