-- admin_delete: an operator deletes one record, optionally only in a given state or route.
--
-- KEYS[1]  the record hash, "{prefix}:rec:{scope}:{key}" (built by the server)
-- ARGV[1]  only_state  '' for any state, else e.g. 'in_flight' (release a stuck lock)
-- ARGV[2]  only_route  '' for any route, else the route name (bulk purge by route)
--
-- Returns {deleted, state, route}: deleted is 1 when the record was deleted, 0 when it
-- did not exist ({0, '', ''}) or did not match (state and route as stored, for events).
if redis.call('EXISTS', KEYS[1]) == 0 then
  return {0, '', ''}
end
local rec = redis.call('HMGET', KEYS[1], 'state', 'route')
local state = rec[1] or ''
local route = rec[2] or ''
if ARGV[1] ~= '' and state ~= ARGV[1] then
  return {0, state, route}
end
if ARGV[2] ~= '' and route ~= ARGV[2] then
  return {0, state, route}
end
redis.call('DEL', KEYS[1])
return {1, state, route}
