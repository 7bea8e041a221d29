-- release: give the key up so a retry executes again (e.g. after a 5xx, or a request
-- whose client left before it reached the upstream).
--
-- KEYS[1]  the record hash, "{prefix}:rec:{scope}:{key}" (built by the server)
-- ARGV[1]  fencing_token   the token of the claim
-- ARGV[2]  tombstone_ms    lifetime of the release tombstone, ms (integer > 0)
--
-- The in-flight record is replaced by a tombstone {state = 'released', token} that lives
-- tombstone_ms: a claim with that token that runs later (its release overtook it, e.g.
-- through another server) answers 'released' and writes nothing; any other claim treats
-- the tombstone as absent.
--
-- Returns {'released', route} or {'lock_lost'}:
--   - in_flight with this token: tombstone written, {'released', route}
--   - absent, or a tombstone of this token: tombstone (re)written, {'released', ''} (a
--     release retried after its reply was lost, or one that overtook its own claim)
--   - anything else (another token holds it, completed, unknown): {'lock_lost'}, nothing
--     written
local rec = redis.call('HMGET', KEYS[1], 'state', 'token', 'route')
local state = rec[1]
local route = ''
if state == 'in_flight' and rec[2] == ARGV[1] then
  route = rec[3] or ''
elseif state and not (state == 'released' and rec[2] == ARGV[1]) then
  return {'lock_lost'}
end
-- DEL first on purpose: it is not refused when Redis' memory is full, and after it the
-- small tombstone is written too (a script that wrote runs to its end), so a release
-- still frees its key under 'noeviction' with maxmemory reached; memory only shrinks.
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'state', 'released', 'token', ARGV[1])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]))
return {'released', route}
