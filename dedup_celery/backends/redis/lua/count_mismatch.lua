-- Count a duplicate whose payload differs from the record's.
-- KEYS[1]: the record. Returns 1 if there was a record to count on, else 0:
-- a missing record is not created (a hash of one counter is no record).
if redis.call('HEXISTS', KEYS[1], 'owner') == 0 then
  return 0
end
redis.call('HINCRBY', KEYS[1], 'payload_mismatches', 1)
return 1
