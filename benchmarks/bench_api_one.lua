-- wrk script for benchmarks/bench_api_floor.py: one fixed request, sent again and again.
--
--   wrk --threads N --connections N --duration 5s --script bench_api_one.lua http://127.0.0.1:PORT \
--       -- TOKEN METHOD PATH EXPECTED-STATUS [BODY]
--
-- A request with a body is sent as application/json.  Prints one JSON line: answers with the expected
-- status and the others, socket errors, the run's length and its latency percentiles (microseconds), as
-- bench_api_mix.lua does.

-- The JSON line and the thread bookkeeping: bench_api_report.lua, beside this script.
local report = dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "bench_api_report.lua")

function setup(thread)
   report.setup(thread)
end

function init(args)
   local headers = {["X-Auth-Token"] = args[1]}
   local body = args[5]
   if body then
      headers["Content-Type"] = "application/json"
   end
   expected = tonumber(args[4])
   req = wrk.format(args[2], args[3], headers, body)
   ok, failed, first = 0, 0, ""
end

function request()
   return req
end

function response(status, headers, body)
   report.count(status == expected, status)
end

function done(summary, latency, requests)
   report.done(summary, latency)
end
