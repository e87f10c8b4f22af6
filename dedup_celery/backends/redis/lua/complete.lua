-- Mark the record CONSUMED if the owner still holds it; recreate it if it is gone.
-- KEYS[1]: the record.
-- ARGV: owner, ttl_ms, result (JSON, or "" for none), scope, key_digest, then
-- the claimant's values as one JSON array of strings in CLAIMANT_FIELDS order
-- (to recreate a record that is gone).
-- Returns 1, or 0 when another owner holds the record.
local key = KEYS[1]
local ttl = tonumber(ARGV[2])
local current = redis.call('HGET', key, 'owner')
if current and current ~= ARGV[1] then
  return 0
end
if not current then
  local values = cjson.decode(ARGV[6])
  local written = {'scope', ARGV[4], 'key_digest', ARGV[5], 'created_at', now,
    'skipped', 0, 'rescheduled', 0, 'takeovers', 0}
  for i, name in ipairs(CLAIMANT_FIELDS) do
    written[#written + 1] = name
    written[#written + 1] = values[i]
  end
  written[#written + 1] = 'payload_owner'
  written[#written + 1] = ARGV[1]
  redis.call('DEL', key)
  redis.call('HSET', key, unpack(written))
end
redis.call('HSET', key, 'status', CONSUMED, 'consumed_at', now, 'updated_at', now,
  'expires_at', now + ttl)
if ARGV[3] ~= '' then
  redis.call('HSET', key, 'result', ARGV[3])
else
  redis.call('HDEL', key, 'result')
end
redis.call('PEXPIRE', key, ttl)
return 1
