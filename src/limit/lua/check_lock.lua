-- A queued caller reached its slot: is the key locked now? Returns remaining lock time or 0.
-- KEYS: 1 lock; ARGV: 1 now override
local now = clock(ARGV[1])
local lock = locked_until(KEYS[1])
if lock > now then return lock - now end
return 0
