-- complete: store the response of the execution that holds the lock.
--
-- KEYS[1]  the record hash, "{prefix}:rec:{scope}:{key}" (built by the server)
-- ARGV[1]  fencing_token  the token returned by claim
-- ARGV[2]  status         upstream status code
-- ARGV[3]  headers_json   JSON array of [name, value] pairs ('' when not replayable)
-- ARGV[4]  body           raw body bytes, binary-safe ('' when not replayable)
-- ARGV[5]  replayable     '1' or '0'
-- ARGV[6]  ttl_ms         lifetime of the completed record in milliseconds (integer > 0)
--
-- Returns {'completed', route} (record now completed, PEXPIRE ttl_ms, replays = 0; route is
-- the route stored by claim, for events) or {'lock_lost'} (state is not in_flight or the
-- token is not the current one; nothing written).
--
-- Fencing is by equality: once the lock TTL passes, the record vanishes; a new claim writes
-- a fresh token, so the first holder's late complete no longer matches.
local rec = redis.call('HMGET', KEYS[1], 'state', 'token', 'route')
if rec[1] ~= 'in_flight' or rec[2] ~= ARGV[1] then
  return {'lock_lost'}
end

local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl_ms = tonumber(ARGV[6])

redis.call('HSET', KEYS[1],
  'state', 'completed',
  'status', ARGV[2],
  'headers', ARGV[3],
  'body', ARGV[4],
  'replayable', ARGV[5],
  'completed_ms', string.format('%.0f', now_ms),
  'expires_ms', string.format('%.0f', now_ms + ttl_ms),
  'replays', 0)
redis.call('PEXPIRE', KEYS[1], ttl_ms)
return {'completed', rec[3] or ''}
