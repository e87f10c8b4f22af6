-- End the lease of the PROCESSING record a given process holds for a task id.
-- KEYS[1]: the record. ARGV: task_id, hostname, pid, process_start, boot_id,
-- pid_namespace: all six must match the record.
local key = KEYS[1]
local f = redis.call('HMGET', key, 'status', 'task_id', 'hostname', 'pid', 'process_start',
  'boot_id', 'pid_namespace')
if f[1] ~= PROCESSING then
  return 0
end
for i = 1, 6 do
  if f[i + 1] ~= ARGV[i] then
    return 0
  end
end
redis.call('HSET', key, 'expires_at', now - 1)
return 1
