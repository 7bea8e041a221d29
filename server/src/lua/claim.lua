-- claim: try to become the one execution of a request with this idempotency key.
--
-- KEYS[1]  the record hash, "{prefix}:rec:{scope}:{key}" (built by the server)
-- ARGV[1]  fencing_token  fresh random token made by the server (32 lowercase hex)
-- ARGV[2]  fingerprint    request fingerprint (64 lowercase hex)
-- ARGV[3]  route          filter route name
-- ARGV[4]  method         request method
-- ARGV[5]  path           request path with query
-- ARGV[6]  lock_ttl_ms    in-flight lock lifetime in milliseconds (integer > 0)
--
-- Returns one array:
--   {'acquired'}                                   record written as in_flight, PEXPIRE lock_ttl_ms
--   {'in_flight', retry_after_ms}                  same fingerprint holds the lock; remaining PTTL
--   {'mismatch'}                                   record (in flight or completed) has another fingerprint
--   {'replay', status, headers_json, body}         completed + same fingerprint + replayable;
--                                                  replays += 1, last_replay_ms = now
--   {'not_replayable', status}                     completed + same fingerprint, response not stored
--   {'corrupt', state}                             unknown state; nothing written
--
-- Time is Redis' own clock (TIME), so the clocks of the servers do not matter.
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lock_ttl_ms = tonumber(ARGV[6])

local rec = redis.call('HMGET', KEYS[1], 'state', 'fp', 'replayable', 'status')
local state = rec[1]

if not state then
  redis.call('HSET', KEYS[1],
    'state', 'in_flight',
    'token', ARGV[1],
    'fp', ARGV[2],
    'route', ARGV[3],
    'method', ARGV[4],
    'path', ARGV[5],
    'created_ms', string.format('%.0f', now_ms),
    'lock_expires_ms', string.format('%.0f', now_ms + lock_ttl_ms))
  redis.call('PEXPIRE', KEYS[1], lock_ttl_ms)
  return {'acquired'}
end

if state == 'in_flight' then
  if rec[2] ~= ARGV[2] then
    return {'mismatch'}
  end
  local pttl_ms = redis.call('PTTL', KEYS[1])
  if pttl_ms < 0 then
    pttl_ms = 0
  end
  return {'in_flight', pttl_ms}
end

if state == 'completed' then
  if rec[2] ~= ARGV[2] then
    return {'mismatch'}
  end
  local status = tonumber(rec[4]) or 0
  if rec[3] ~= '1' then
    return {'not_replayable', status}
  end
  redis.call('HINCRBY', KEYS[1], 'replays', 1)
  redis.call('HSET', KEYS[1], 'last_replay_ms', string.format('%.0f', now_ms))
  local resp = redis.call('HMGET', KEYS[1], 'headers', 'body')
  return {'replay', status, resp[1] or '', resp[2] or ''}
end

return {'corrupt', tostring(state)}
