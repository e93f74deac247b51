-- A queued caller went away: give its reservation back.
-- KEYS: 1 send log (window) or TAT (gcra)
-- ARGV: 1 'window' | 'gcra', 2 member (window) or the TAT the reservation left (gcra), 3 period
if ARGV[1] == 'window' then
  return redis.call('ZREM', KEYS[1], ARGV[2])
end
-- GCRA: only the newest cell can be given back (nothing was taken after it).
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat == tonumber(ARGV[2]) then
  redis.call('SET', KEYS[1], tat - tonumber(ARGV[3]), 'KEEPTTL')
  return 1
end
return 0
