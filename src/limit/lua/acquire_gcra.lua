-- GCRA decision for one (route, user): one theoretical arrival time (TAT) per key.
-- KEYS: 1 TAT, 2 lock, 3 epoch, 4 the same key's send log (kept while the route used `window`,
--       before a reload)
-- ARGV: 1 now override, 2 burst, 3 period, 4 max_wait (-1: reject mode), 5 max queued per key,
--       6 window, 7 units per ms, 8 epoch guard on ('1'/'0')
-- Returns {status, wait, remaining, reset_in, new_tat}
local now = clock(ARGV[1])
local burst = tonumber(ARGV[2])
local period = tonumber(ARGV[3])
local max_wait = tonumber(ARGV[4])
local max_queued = tonumber(ARGV[5])
local window = tonumber(ARGV[6])
local units_per_ms = tonumber(ARGV[7])
local tau = (burst - 1) * period

local lock = locked_until(KEYS[2])
if lock > now then return {'locked', lock - now, 0, lock - now, 0} end

local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
-- A route switched from the window log by a reload: as if the whole quota went a window after
-- the newest send it holds (the log lives until then).
local newest = redis.call('ZRANGE', KEYS[4], -1, -1, 'WITHSCORES')[2]
if newest then
  local assumed = tonumber(newest) + window + tau
  if assumed > tat then tat = assumed end
end
local e = epoch(KEYS[3], now, ARGV[8])
if e > 0 and tat < e then
  -- No send recorded since the data began: as if the whole quota went at the epoch.
  local assumed = e + window + tau
  if assumed > tat then tat = assumed end
end
local slot = tat - tau
if slot < now then slot = now end
local wait = slot - now
if wait > 0 then
  if max_wait < 0 then return {'limited', wait, 0, wait, 0} end
  if wait > max_wait then return {'too_far', wait, 0, wait, 0} end
  local queued = math.floor(wait / period)
  if queued >= max_queued then return {'queue_full', wait, 0, wait, 0} end
end
local base = tat
if slot > base then base = slot end
local new_tat = base + period
-- Kept a window past the TAT: a route switched to `window` by a reload still counts these sends.
redis.call('SET', KEYS[1], new_tat, 'PX', ttl_ms(new_tat - now + window, units_per_ms))

local remaining = 0
local earliest = new_tat - tau
if earliest <= now then
  remaining = math.floor((now + tau - new_tat) / period) + 1
  if remaining > burst then remaining = burst end
end
local reset_in = 0
if remaining == 0 then reset_in = earliest - now end
return {'ok', wait, remaining, reset_in, new_tat}
