-- Moves the epoch to ARGV[2] units from now: until a window after it, every key is treated as
-- if its whole quota went at the epoch (see `epoch` in the prelude). Used when callers move to
-- new keys (the identity scheme changed); the offset covers slots promised under the old keys.
-- Never moves an epoch back.
-- KEYS: 1 epoch key. ARGV: 1 now override, 2 offset from now.
local at = clock(ARGV[1]) + tonumber(ARGV[2])
local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
if at > cur then redis.call('SET', KEYS[1], at) end
return 1
