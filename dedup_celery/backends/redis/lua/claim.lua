-- Claim, take over, poison or count a duplicate, in one step.
-- KEYS[1]: the record.
-- ARGV: owner, lease_ms, ttl_ms, max_takeovers, scope, key_digest, then the
-- claimant's fields as name/value pairs (key, status PROCESSING, owner,
-- task_id, ... as CLAIMANT_FIELDS in Python lists them).
-- Returns {"first", now} when there was no record (the common case: the caller
-- knows every field it wrote); otherwise the record's fields, then "now" and
-- "changed" ("1" if this claim poisoned it).
local key = KEYS[1]
local owner = ARGV[1]
local lease = tonumber(ARGV[2])
local ttl = tonumber(ARGV[3])
local cap = tonumber(ARGV[4])
local claimant = {}
for i = 7, #ARGV, 2 do
  claimant[ARGV[i]] = ARGV[i + 1]
end
local changed = '0'
local function own(takeovers)
  redis.call('HSET', key, unpack(ARGV, 7))
  redis.call('HSET', key, 'updated_at', now, 'expires_at', now + lease, 'takeovers', takeovers,
    'purge_after', now + lease + ttl)
  redis.call('HDEL', key, 'consumed_at', 'heartbeat_at', 'result')
  redis.call('PEXPIRE', key, lease + ttl)
end
local fields = redis.call('HMGET', key, 'owner', 'status', 'expires_at', 'takeovers',
  'task_id', 'attempt')
local current = fields[1]
if not current then
  redis.call('DEL', key)
  redis.call('HSET', key, 'scope', ARGV[5], 'key_digest', ARGV[6], 'created_at', now,
    'skipped', 0, 'rescheduled', 0)
  own(0)
  return {'first', now}
elseif current ~= owner then
  local status = fields[2]
  local expired = tonumber(fields[3]) < now
  local takeovers = tonumber(fields[4])
  local stale = status == FAILED and not expired and fields[5] == claimant['task_id']
    and tonumber(fields[6]) >= tonumber(claimant['attempt'])
  if status == PROCESSING and expired then
    if takeovers < cap then
      own(takeovers + 1)
    else
      redis.call('HSET', key, 'status', POISONED, 'updated_at', now, 'expires_at', now + ttl)
      redis.call('PEXPIRE', key, ttl)
      changed = '1'
    end
  elseif ((status == CONSUMED or status == POISONED) and expired)
      or (status == FAILED and not stale) then
    own(0)
  else
    if status == PROCESSING then
      redis.call('HINCRBY', key, 'rescheduled', 1)
    else
      redis.call('HINCRBY', key, 'skipped', 1)
    end
    redis.call('HSET', key, 'last_duplicate_at', now)
  end
end
local record = redis.call('HGETALL', key)
table.insert(record, 'now')
table.insert(record, now)
table.insert(record, 'changed')
table.insert(record, changed)
return record
