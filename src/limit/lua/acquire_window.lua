-- Sliding-log decision for one (route, user): may this call go, and when?
-- KEYS: 1 send log (sorted set: score = send or reserved time, member = unique id), 2 lock, 3 epoch,
--       4 the same key's GCRA TAT (set while the route used `gcra`, before a reload)
-- ARGV: 1 now override, 2 limit, 3 window, 4 max_wait (-1: reject mode), 5 max queued per key,
--       6 member, 7 units per ms, 8 epoch guard on ('1'/'0')
-- Returns {status, wait, remaining, reset_in}; status: ok | locked | limited | too_far | queue_full
local now = clock(ARGV[1])
local limit = tonumber(ARGV[2])
local window = tonumber(ARGV[3])
local max_wait = tonumber(ARGV[4])
local max_queued = tonumber(ARGV[5])
local units_per_ms = tonumber(ARGV[7])

local lock = locked_until(KEYS[2])
if lock > now then return {'locked', lock - now, 0, lock - now} end

-- Sends at or before now - window constrain no slot from now on.
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
local n = redis.call('ZCARD', KEYS[1])
local slot = now
if n > 0 then
  local newest = tonumber(redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')[2])
  if newest > slot then slot = newest end -- FIFO: never before a reservation
  if n >= limit then
    local kth = tonumber(redis.call('ZRANGE', KEYS[1], n - limit, n - limit, 'WITHSCORES')[2])
    if kth + window > slot then slot = kth + window end
  end
end
-- A route switched from GCRA by a reload: GCRA's sends all lie before its TAT and may fall in
-- one window with the next ones; none goes before a window after that TAT (the TAT key lives
-- that long).
local g = tonumber(redis.call('GET', KEYS[4]) or '0')
if g > 0 and g + window > slot then slot = g + window end
local e = epoch(KEYS[3], now, ARGV[8])
if n < limit and e > 0 and e + window > slot then slot = e + window end

local wait = slot - now
if wait > 0 then
  if max_wait < 0 then return {'limited', wait, 0, wait} end
  if wait > max_wait then return {'too_far', wait, 0, wait} end
  local queued = redis.call('ZCOUNT', KEYS[1], '(' .. now, '+inf')
  if queued >= max_queued then return {'queue_full', wait, 0, wait} end
end
redis.call('ZADD', KEYS[1], slot, ARGV[6])
redis.call('PEXPIRE', KEYS[1], ttl_ms(slot - now + window, units_per_ms))

-- What the caller is told (RateLimit headers), as of now.
local used = redis.call('ZCOUNT', KEYS[1], '(' .. (now - window), '+inf')
local remaining = limit - used
if remaining < 0 then remaining = 0 end
local reset_in = 0
if remaining == 0 then
  local m = redis.call('ZCARD', KEYS[1])
  local kth = tonumber(redis.call('ZRANGE', KEYS[1], m - limit, m - limit, 'WITHSCORES')[2])
  reset_in = kth + window - now
  if reset_in < 0 then reset_in = 0 end
end
return {'ok', wait, remaining, reset_in}
