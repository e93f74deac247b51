-- Zoho signalled a throttle: lock the key for `duration` from now, unless already locked longer.
-- KEYS: 1 lock; ARGV: 1 now override, 2 duration, 3 units per ms
local now = clock(ARGV[1])
local want = now + tonumber(ARGV[2])
local cur = locked_until(KEYS[1])
if want > cur then
  redis.call('SET', KEYS[1], want, 'PX', ttl_ms(tonumber(ARGV[2]), tonumber(ARGV[3])))
  return want - now
end
return cur - now
