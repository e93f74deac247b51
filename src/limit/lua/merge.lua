-- After an outage in `on_error: local` mode: add this replica's local sends to the shared state.
-- KEYS: 1 send log (window) or TAT (gcra)
-- ARGV: 1 now override, 2 'window' | 'gcra', 3 window, 4 units per ms, then
--   window: pairs of (age, member): a send `age` units ago
--   gcra: 5 the local TAT as an offset from now (may be negative)
local now = clock(ARGV[1])
local window = tonumber(ARGV[3])
local units_per_ms = tonumber(ARGV[4])
if ARGV[2] == 'window' then
  for i = 5, #ARGV, 2 do
    local at = now - tonumber(ARGV[i])
    redis.call('ZADD', KEYS[1], at, ARGV[i + 1])
  end
  -- Kept until a window after the newest send or reservation, whoever recorded it: never
  -- shortened below what another replica's reservation needs.
  local newest = now
  local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
  if last[2] and tonumber(last[2]) > newest then newest = tonumber(last[2]) end
  redis.call('PEXPIRE', KEYS[1], ttl_ms(newest - now + window, units_per_ms))
  return 1
end
local tat = now + tonumber(ARGV[5])
local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat > cur then
  redis.call('SET', KEYS[1], tat, 'PX', ttl_ms(tat - now + window, units_per_ms))
end
return 1
