-- Compare-and-delete for an operator or a requeue (dedup_celery.states.may_release):
-- a POISONED or QUEUED record, or a PROCESSING one (with expired_only, only once its
-- lease ended).
-- KEYS[1]: the record. ARGV: owner, expired_only ("1" or "0").
local key = KEYS[1]
local fields = redis.call('HMGET', key, 'owner', 'status', 'expires_at')
if fields[1] ~= ARGV[1] then
  return 0
end
if fields[2] == PROCESSING then
  if ARGV[2] == '1' and tonumber(fields[3]) >= now then
    return 0
  end
elseif fields[2] ~= POISONED and fields[2] ~= QUEUED then
  return 0
end
redis.call('DEL', key)
return 1
