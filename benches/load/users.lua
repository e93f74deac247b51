-- wrk script for benches/load/run.sh: the same calls for every target.
--
-- POST <path> with a small JSON body and `Authorization: Zoho-oauthtoken user<N>`, N cycling over
-- USERS distinct users (10,000 by default). The requests are built once per thread in init(), so
-- the per-request cost on wrk's side is the same for every target and stays small.
--
-- Environment (read by run.sh's wrk invocation):
--   LOAD_USERS     distinct users (default 10000)
--   LOAD_PATH      request path (default /api/v3/chats/C1/message)
--   LOAD_DELAY_MS  if > 0, each connection pauses this long before each request (paced, moderate
--                  load; wrk measures latency from the moment a request is written, so the pause
--                  is not counted)
--
-- done() prints one machine-readable line:
--   WRKRESULT requests=<n> duration_us=<n> rps=<x> p50_us=<n> p90_us=<n> p99_us=<n> p999_us=<n>
--             max_us=<n> non2xx=<n> socket_errors=<n>

local users = tonumber(os.getenv("LOAD_USERS") or "10000")
local path = os.getenv("LOAD_PATH") or "/api/v3/chats/C1/message"
local pause = tonumber(os.getenv("LOAD_DELAY_MS") or "0")
local body = '{"text":"load test"}'

local next_thread = 0
function setup(thread)
  thread:set("thread_index", next_thread)
  next_thread = next_thread + 1
end

local requests = {}
local i = 0

function init(args)
  wrk.method = "POST"
  wrk.body = body
  wrk.headers["Content-Type"] = "application/json"
  for n = 0, users - 1 do
    wrk.headers["Authorization"] = "Zoho-oauthtoken user" .. n
    requests[n + 1] = wrk.format("POST", path)
  end
  -- Threads start at different users so they do not walk the same keys in lockstep.
  i = ((thread_index or 0) * 7919) % users
end

function request()
  i = i + 1
  if i > users then
    i = 1
  end
  return requests[i]
end

if pause > 0 then
  function delay()
    return pause
  end
end

function done(summary, latency, requests)
  local e = summary.errors
  local socket_errors = e.connect + e.read + e.write + e.timeout
  local secs = summary.duration / 1e6
  io.write(string.format(
    "WRKRESULT requests=%d duration_us=%d rps=%.1f p50_us=%d p90_us=%d p99_us=%d p999_us=%d max_us=%d non2xx=%d socket_errors=%d\n",
    summary.requests, summary.duration, summary.requests / secs,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.max, e.status, socket_errors))
end
