-- Delete (or, with ARGV[1] = "1", only count) the given records that are due,
-- judged inside the script: expires_at has passed, and purge_after too. A
-- PROCESSING record without purge_after (from a release before it existed) is
-- left to its key's TTL, which a claim sets to the lease plus RECORD_TTL: its
-- takeovers count is what stops a poison message.
-- KEYS: candidate records.
local count = 0
for _, key in ipairs(KEYS) do
  local fields = redis.call('HMGET', key, 'expires_at', 'purge_after', 'status')
  local expires, purge_after = tonumber(fields[1]), tonumber(fields[2])
  local due = expires and expires < now
  if due and purge_after then
    due = purge_after < now
  elseif due then
    due = fields[3] ~= PROCESSING
  end
  if due then
    count = count + 1
    if ARGV[1] ~= '1' then
      redis.call('DEL', key)
    end
  end
end
return count
