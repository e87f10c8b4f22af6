-- End the lease of the PROCESSING record a given process holds for a task id.
-- KEYS[1]: the record. ARGV: task_id, then the identity's fields as name/value
-- pairs (hostname, pid, process_start, boot_id, pid_namespace).
local key = KEYS[1]
local f = redis.call('HMGET', key, 'status', 'task_id')
if f[1] ~= PROCESSING or f[2] ~= ARGV[1] then
  return 0
end
for i = 2, #ARGV, 2 do
  if redis.call('HGET', key, ARGV[i]) ~= ARGV[i + 1] then
    return 0
  end
end
redis.call('HSET', key, 'expires_at', now - 1)
return 1
