-- Change a PROCESSING record this owner holds: FAILED until now + ms ("fail"),
-- the lease renewed to now + ms ("renew"), or the lease ended now ("expire").
-- KEYS[1]: the record. ARGV: owner, what, ms, and for "renew" the ms the record
-- must outlive it by (the lease plus RECORD_TTL, as after a claim).
local key = KEYS[1]
local fields = redis.call('HMGET', key, 'owner', 'status', 'expires_at')
if fields[1] ~= ARGV[1] or fields[2] ~= PROCESSING then
  return 0
end
local ms = tonumber(ARGV[3])
if ARGV[2] == 'fail' then
  redis.call('HSET', key, 'status', FAILED, 'updated_at', now, 'expires_at', now + ms)
  redis.call('PEXPIRE', key, ms)
elseif ARGV[2] == 'renew' then
  local keep = math.max(ms, tonumber(ARGV[4]) or 0)
  redis.call('HSET', key, 'expires_at', now + ms, 'heartbeat_at', now, 'purge_after', now + keep)
  local ttl = redis.call('PTTL', key)
  if ttl >= 0 and ttl < keep then
    redis.call('PEXPIRE', key, keep)
  end
else
  redis.call('HSET', key, 'expires_at', now - 1)
end
return 1
