-- complete: record the outcome of the execution that holds the lock.
--
-- KEYS[1]  the record hash, "{prefix}:rec:{scope}:{key}" (built by the server)
-- ARGV[1]  fencing_token  the token of the claim
-- ARGV[2]  status         upstream status code
-- ARGV[3]  headers_json   JSON array of [name, value] pairs ('' when not replayable)
-- ARGV[4]  body           raw body bytes, binary-safe ('' when not replayable)
-- ARGV[5]  replayable     '1' or '0'
-- ARGV[6]  ttl_ms         lifetime of the completed record in milliseconds (integer > 0)
-- ARGV[7]  unknown        '1' when the outcome is unknown (the request may have reached
--                         the upstream, no response is known), else '0'
--
-- Returns {'completed', route} (route as stored by claim, for events) or {'lock_lost'}.
--   - in_flight with this token (also after its lock expired: a late answer still lands
--     while no other claim took the key): completed (PEXPIRE ttl_ms, replays = 0), or with
--     unknown = '1' and a claim policy ('after' set): state 'unknown' until now + hold_ms,
--     then gone ('reexecute', PEXPIRE hold_ms) or refusing ('refuse', PEXPIRE
--     max(hold_ms, refuse_ttl_ms)); without a policy: completed, not replayable.
--   - completed or unknown with this token: nothing written, {'completed', route} again
--     (a complete retried after its reply was lost).
--   - anything else (another token, absent, a release tombstone): {'lock_lost'}.
-- Memory: the first write is HSET, so when Redis' memory is full ('noeviction' with
-- maxmemory reached) it refuses the complete with an OOM error and writes nothing; the
-- record stays in flight and the caller retries.
local rec = redis.call('HMGET', KEYS[1], 'state', 'token', 'route', 'after', 'hold_ms',
  'refuse_ttl_ms')
local state = rec[1]
if rec[2] ~= ARGV[1] then
  return {'lock_lost'}
end
if state == 'completed' or state == 'unknown' then
  return {'completed', rec[3] or ''}
end
if state ~= 'in_flight' then
  return {'lock_lost'}
end

local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl_ms = tonumber(ARGV[6])
local after = rec[4] or ''

if ARGV[7] == '1' and after ~= '' then
  local hold_ms = tonumber(rec[5]) or 0
  redis.call('HSET', KEYS[1],
    'state', 'unknown',
    'status', ARGV[2],
    'replayable', '0',
    'completed_ms', string.format('%.0f', now_ms),
    'unknown_until_ms', string.format('%.0f', now_ms + hold_ms))
  local life_ms = hold_ms
  if after == 'refuse' then
    life_ms = math.max(hold_ms, tonumber(rec[6]) or 0)
  end
  redis.call('HSET', KEYS[1], 'expires_ms', string.format('%.0f', now_ms + life_ms))
  redis.call('PEXPIRE', KEYS[1], math.max(life_ms, 1))
  return {'completed', rec[3] or ''}
end

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
