-- Starts the epoch now: for one window every key is treated as if its whole quota went now
-- (see `epoch` in the prelude). Used when callers move to new keys (the identity scheme changed).
-- KEYS: 1 epoch key. ARGV: 1 now override.
redis.call('SET', KEYS[1], clock(ARGV[1]))
return 1
