-- claim: try to become the one execution of a request with this idempotency key.
--
-- KEYS[1]  the record hash, "{prefix}:rec:{scope}:{key}" (built by the server)
-- ARGV[1]  fencing_token  the claim's token (32 lowercase hex), unique per request: made
--                         by the filter (so a retried claim recognises its own lock) or,
--                         for callers without one, fresh by the server
-- ARGV[2]  fingerprint    request fingerprint (64 lowercase hex)
-- ARGV[3]  route          filter route name
-- ARGV[4]  method         request method
-- ARGV[5]  path           request path with query
-- ARGV[6]  lock_ttl_ms    in-flight lock lifetime in milliseconds (integer > 0)
-- ARGV[7]  after          'reexecute' | 'refuse' | '' (no unknown-outcome policy: an
--                         expired lock vanishes, the legacy rule)
-- ARGV[8]  hold_ms        how long an unknown outcome is held, ms ('0' without a policy)
-- ARGV[9]  refuse_ttl_ms  with 'refuse', how long the record refuses after it became
--                         unknown, ms ('0' otherwise)
--
-- Returns one array:
--   {'acquired'}                              record written as in_flight (or this very
--                                             token already holds it: a retried claim)
--   {'in_flight', remaining_ms, age_ms}       same fingerprint holds a live lock
--   {'unknown', remaining_ms}                 outcome unknown, held for remaining_ms more
--   {'unknown_final'}                         outcome unknown, held out under 'refuse'
--   {'released'}                              this token was released before its claim
--                                             ran (the client left); nothing written
--   {'mismatch'}                              record has another fingerprint
--   {'replay', status, headers_json, body}    completed + same fingerprint + replayable;
--                                             replays += 1, last_replay_ms = now (not
--                                             counted when Redis' memory is full)
--   {'not_replayable', status}                completed + same fingerprint, not stored
--   {'corrupt', state}                        unknown state; nothing written
--
-- Record lifetime: an in-flight record lives lock_ttl_ms, plus hold_ms ('reexecute') or
-- refuse_ttl_ms ('refuse') so that an expired lock reads as an unknown outcome rather
-- than vanishing. A 'released' record is a tombstone: {state, token} only.
--
-- Time is Redis' own clock (TIME), so the clocks of the servers do not matter.
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lock_ttl_ms = tonumber(ARGV[6])
local after = ARGV[7]
local hold_ms = tonumber(ARGV[8])
local refuse_ttl_ms = tonumber(ARGV[9])

local rec = redis.call('HMGET', KEYS[1], 'state', 'fp', 'replayable', 'status', 'token',
  'lock_expires_ms', 'created_ms', 'unknown_until_ms', 'after', 'hold_ms')
local state = rec[1]

-- Memory: the first write of a script decides whether Redis refuses it when memory is
-- full ('noeviction' with maxmemory reached): a denyoom command (HSET, HINCRBY) as the
-- first write is refused with an OOM error and nothing is written; after any write, every
-- later command runs, past maxmemory. So acquire() writes with HSET first (a full Redis
-- refuses the claim cleanly, and a record it replaces is kept) and only then removes the
-- fields an older record left; a replay counts with pcall so a full Redis still replays.
local new_fields = {
  state = true, token = true, fp = true, route = true, method = true, path = true,
  created_ms = true, lock_expires_ms = true, after = true, hold_ms = true,
  refuse_ttl_ms = true,
}

local function acquire()
  redis.call('HSET', KEYS[1],
    'state', 'in_flight',
    'token', ARGV[1],
    'fp', ARGV[2],
    'route', ARGV[3],
    'method', ARGV[4],
    'path', ARGV[5],
    'created_ms', string.format('%.0f', now_ms),
    'lock_expires_ms', string.format('%.0f', now_ms + lock_ttl_ms),
    'after', after,
    'hold_ms', string.format('%.0f', hold_ms),
    'refuse_ttl_ms', string.format('%.0f', refuse_ttl_ms))
  if state then
    -- Replacing a record (a tombstone, an unknown outcome whose hold is over): drop what
    -- it had that a new claim does not write.
    for _, field in ipairs(redis.call('HKEYS', KEYS[1])) do
      if not new_fields[field] then
        redis.call('HDEL', KEYS[1], field)
      end
    end
  end
  local life_ms = lock_ttl_ms
  if after == 'reexecute' then
    life_ms = lock_ttl_ms + hold_ms
  elseif after == 'refuse' then
    life_ms = lock_ttl_ms + refuse_ttl_ms
  end
  redis.call('PEXPIRE', KEYS[1], life_ms)
  return {'acquired'}
end

-- An unknown outcome held until until_ms under the record's own policy.
local function unknown(until_ms, rec_after)
  if now_ms < until_ms then
    return {'unknown', until_ms - now_ms}
  end
  if rec_after == 'refuse' then
    return {'unknown_final'}
  end
  -- 'reexecute' (or no policy) and the hold is over: the record counts as gone.
  return acquire()
end

if not state then
  return acquire()
end

if state == 'released' then
  if rec[5] == ARGV[1] then
    return {'released'}
  end
  return acquire()
end

if state == 'in_flight' then
  if rec[2] ~= ARGV[2] then
    return {'mismatch'}
  end
  if rec[5] == ARGV[1] then
    return {'acquired'}
  end
  local lock_expires_ms = tonumber(rec[6]) or 0
  if now_ms < lock_expires_ms then
    return {'in_flight', lock_expires_ms - now_ms, now_ms - (tonumber(rec[7]) or now_ms)}
  end
  -- The lock expired with nothing stored: the outcome is unknown.
  return unknown(lock_expires_ms + (tonumber(rec[10]) or 0), rec[9] or '')
end

if state == 'unknown' then
  if rec[2] ~= ARGV[2] then
    return {'mismatch'}
  end
  return unknown(tonumber(rec[8]) or 0, rec[9] or '')
end

if state == 'completed' then
  if rec[2] ~= ARGV[2] then
    return {'mismatch'}
  end
  local status = tonumber(rec[4]) or 0
  if rec[3] ~= '1' then
    return {'not_replayable', status}
  end
  -- Bookkeeping only: with memory full these writes are refused, the replay is not.
  redis.pcall('HINCRBY', KEYS[1], 'replays', 1)
  redis.pcall('HSET', KEYS[1], 'last_replay_ms', string.format('%.0f', now_ms))
  local resp = redis.call('HMGET', KEYS[1], 'headers', 'body')
  return {'replay', status, resp[1] or '', resp[2] or ''}
end

return {'corrupt', tostring(state)}
