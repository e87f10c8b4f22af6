-- Read a record, with the store's "now" to judge its lease by.
-- KEYS[1]: the record.
local record = redis.call('HGETALL', KEYS[1])
if #record == 0 then
  return record
end
table.insert(record, 'now')
table.insert(record, now)
return record
