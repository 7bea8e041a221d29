-- admin_delete: an operator deletes one record, optionally only in a given state or route.
--
-- KEYS[1]  the record hash, "{prefix}:rec:{scope}:{key}" (built by the server)
-- ARGV[1]  only_states        '' for any state, else a comma-separated list, e.g.
--                             'in_flight,unknown' (release a stuck lock or an unknown outcome)
-- ARGV[2]  only_route         '' for any route, else the route name (bulk purge by route)
-- ARGV[3]  skip_state         '' for none, else a state left alone: purges skip 'in_flight'
--                             records (the upstream may still be executing them; deleting
--                             one would let a retry execute a second time)
-- ARGV[4]  created_before_ms  '' for no bound, else only records claimed at or before this
--                             time (a bulk purge deletes no record newer than its dry run)
--
-- Returns {deleted, state, route}: deleted is 1 when the record was deleted, 0 when it
-- did not exist ({0, '', ''}) or did not match (state and route as stored, for events).
if redis.call('EXISTS', KEYS[1]) == 0 then
  return {0, '', ''}
end
local rec = redis.call('HMGET', KEYS[1], 'state', 'route', 'created_ms')
local state = rec[1] or ''
local route = rec[2] or ''
local created_ms = tonumber(rec[3] or '') or 0
if ARGV[1] ~= '' and not string.find(',' .. ARGV[1] .. ',', ',' .. state .. ',', 1, true) then
  return {0, state, route}
end
if ARGV[2] ~= '' and route ~= ARGV[2] then
  return {0, state, route}
end
if ARGV[3] ~= '' and state == ARGV[3] then
  return {0, state, route}
end
if ARGV[4] ~= '' and created_ms > tonumber(ARGV[4]) then
  return {0, state, route}
end
redis.call('DEL', KEYS[1])
return {1, state, route}
