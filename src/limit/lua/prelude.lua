-- Shared by every cliqgate script (prepended by the Rust side).
-- Time: Redis's own clock in microseconds, so replica clocks never matter. Tests inject a fake
-- clock through ARGV[1] (then every time and duration is in the caller's unit).
if redis.replicate_commands then pcall(redis.replicate_commands) end
local function clock(override)
  if override ~= '' then return tonumber(override) end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end
-- Expiry in ms for something that matters for `units` more time units; fake clocks keep keys
-- for a fixed, generous time (the test's fake units are not real time).
local function ttl_ms(units, units_per_ms)
  if units_per_ms <= 0 then return 600000 end
  local ms = math.ceil(units / units_per_ms) + 1000
  if ms < 1000 then ms = 1000 end
  return ms
end
-- Data-loss guard: the epoch key records when this Redis's data began. In the first window after
-- that, a key with fewer than `limit` recorded sends is treated as if `limit` sends happened at
-- the epoch: whatever was sent just before a restart is unknown, so assume the worst.
local function epoch(key, now, enabled)
  if enabled ~= '1' then return 0 end
  local e = tonumber(redis.call('GET', key) or '0')
  if e == 0 then
    e = now
    redis.call('SET', key, e)
  end
  return e
end
local function locked_until(key)
  return tonumber(redis.call('GET', key) or '0')
end
