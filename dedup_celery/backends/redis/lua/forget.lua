-- Compare-and-delete for an operator's forget (dedup_celery.states.FORGETTABLE): a
-- CONSUMED or FAILED record, so its message may run again.
-- KEYS[1]: the record. ARGV: owner.
local key = KEYS[1]
local fields = redis.call('HMGET', key, 'owner', 'status')
if fields[1] ~= ARGV[1] or (fields[2] ~= CONSUMED and fields[2] ~= FAILED) then
  return 0
end
redis.call('DEL', key)
return 1
