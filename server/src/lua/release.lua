-- release: give the key up so a retry executes again (e.g. after a 5xx).
--
-- KEYS[1]  the record hash, "{prefix}:rec:{scope}:{key}" (built by the server)
-- ARGV[1]  fencing_token  the token returned by claim
--
-- Returns {'released', route} (the in-flight record is deleted; route as stored by claim,
-- for events) or {'lock_lost'} (state is not in_flight or the token is not the current
-- one; nothing deleted).
local rec = redis.call('HMGET', KEYS[1], 'state', 'token', 'route')
if rec[1] ~= 'in_flight' or rec[2] ~= ARGV[1] then
  return {'lock_lost'}
end
redis.call('DEL', KEYS[1])
return {'released', rec[3] or ''}
