-- wrk script for benchmarks/bench_api.py: the block/unblock mix, one CIDR per connection at a time.
--
--   wrk --threads N --connections N --duration 5s --script bench_api_mix.lua http://127.0.0.1:PORT -- TOKEN RUN
--
-- One connection per wrk thread (threads == connections), so a thread's requests go out one after
-- another: it blocks 10+RUN.THREAD.x.y/32, then unblocks it, then takes the next /32.  A CIDR no other
-- connection and no earlier run uses: a run stopped between block and unblock leaves its CIDR blocked, and
-- the next run must not meet it as a duplicate.  Prints one JSON line: answers that were 200 and those
-- that were not, socket errors, the run's length and its latency percentiles (microseconds).

-- The JSON line and the thread bookkeeping: bench_api_report.lua, beside this script.
local report = dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "bench_api_report.lua")

function setup(thread)
   thread:set("index", report.setup(thread))
end

function init(args)
   run = tonumber(args[2])
   headers = {["X-Auth-Token"] = args[1], ["Content-Type"] = "application/json"}
   n, blocking, ok, failed, first = 0, true, 0, 0, ""
end

-- request() only reads the state and response() moves it on: wrk calls request() once more than it sends
-- (script_verify_request, on the first thread), and again after a reconnect, for a request not answered.
function request()
   local cidr = string.format("%d.%d.%d.%d/32", 10 + run, index, math.floor(n / 256) % 256, n % 256)
   local path = "/v1/remove-external-address-block"
   if blocking then
      path = "/v1/block-external-addresses"
   end
   return wrk.format("POST", path, headers, '{"cidr": "' .. cidr .. '"}')
end

function response(status, headers, body)
   if not blocking then
      n = n + 1
   end
   blocking = not blocking
   report.count(status == 200, status)
end

function done(summary, latency, requests)
   report.done(summary, latency)
end
