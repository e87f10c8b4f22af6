-- Claim, take over, poison or count a duplicate, in one step.
-- KEYS[1]: the record.
-- ARGV: owner, lease_ms, ttl_ms, max_takeovers, scope, key_digest, then the
-- claimant's values as one JSON array of strings, in CLAIMANT_FIELDS order
-- (key, status PROCESSING, or QUEUED for a producer's marker, owner, task_id,
-- ...; "" for none).
-- Returns {"first", now} when there was no record (the common case: the caller
-- knows every field it wrote); otherwise the record's fields, then "now" and
-- "changed" ("1" if this claim poisoned it).
local key = KEYS[1]
local owner = ARGV[1]
local lease = tonumber(ARGV[2])
local ttl = tonumber(ARGV[3])
local cap = tonumber(ARGV[4])
local values = cjson.decode(ARGV[7])
local claimant, written = {}, {}
for i, name in ipairs(CLAIMANT_FIELDS) do
  claimant[name] = values[i]
  written[2 * i - 1] = name
  written[2 * i] = values[i]
end
-- Whose claim the payload_digest is: a claim by an earlier release, which knows
-- no fingerprint, replaces the owner but leaves both, so the digest no longer counts.
written[#written + 1] = 'payload_owner'
written[#written + 1] = owner
local function times(takeovers)
  local n = #written
  written[n + 1], written[n + 2] = 'updated_at', now
  written[n + 3], written[n + 4] = 'expires_at', now + lease
  written[n + 5], written[n + 6] = 'takeovers', takeovers
  written[n + 7], written[n + 8] = 'purge_after', now + lease + ttl
end
local changed = '0'
local function own(takeovers)
  times(takeovers)
  redis.call('HSET', key, unpack(written))
  redis.call('HDEL', key, 'consumed_at', 'heartbeat_at', 'result')
  redis.call('PEXPIRE', key, lease + ttl)
end
local fields = redis.call('HMGET', key, 'owner', 'status', 'expires_at', 'takeovers',
  'task_id', 'attempt')
local current = fields[1]
if not current then
  -- No record (or a hash without an owner, which is replaced): write it whole.
  redis.call('DEL', key)
  times(0)
  redis.call('HSET', key, 'scope', ARGV[5], 'key_digest', ARGV[6], 'created_at', now,
    'skipped', 0, 'rescheduled', 0, unpack(written))
  redis.call('PEXPIRE', key, lease + ttl)
  return {'first', now}
elseif current ~= owner then
  local status = fields[2]
  local expired = tonumber(fields[3]) < now
  local takeovers = tonumber(fields[4])
  local stale = status == FAILED and not expired and fields[5] == claimant['task_id']
    and tonumber(fields[6]) >= tonumber(claimant['attempt'])
  -- A delivery (not another producer's marker) of the task id that queued the message.
  local adopt = status == QUEUED and fields[5] == claimant['task_id']
    and claimant['status'] ~= QUEUED
  -- Only a delivery takes over (or poisons) a lapsed lease, never a producer's marker.
  if status == PROCESSING and expired and claimant['status'] ~= QUEUED then
    if takeovers < cap then
      own(takeovers + 1)
    else
      redis.call('HSET', key, 'status', POISONED, 'updated_at', now, 'expires_at', now + ttl)
      redis.call('PEXPIRE', key, ttl)
      changed = '1'
    end
  elseif ((status == CONSUMED or status == POISONED or status == QUEUED) and expired)
      or (status == FAILED and not stale) or adopt then
    own(0)
  else
    if status == PROCESSING or status == QUEUED then
      redis.call('HINCRBY', key, 'rescheduled', 1)
    else
      redis.call('HINCRBY', key, 'skipped', 1)
    end
    redis.call('HSET', key, 'last_duplicate_at', now,
      'last_duplicate_task_id', claimant['task_id'])
  end
end
local record = redis.call('HGETALL', key)
table.insert(record, 'now')
table.insert(record, now)
table.insert(record, 'changed')
table.insert(record, changed)
return record
