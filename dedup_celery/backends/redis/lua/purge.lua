-- Delete (or, with ARGV[1] = "1", only count) the given records whose
-- expires_at has passed, judged inside the script.
-- KEYS: candidate records.
local count = 0
for _, key in ipairs(KEYS) do
  local expires = redis.call('HGET', key, 'expires_at')
  if expires and tonumber(expires) < now then
    count = count + 1
    if ARGV[1] ~= '1' then
      redis.call('DEL', key)
    end
  end
end
return count
