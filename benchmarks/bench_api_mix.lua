-- wrk script for benchmarks/bench_api.py: the block/unblock mix, one CIDR per connection at a time.
--
--   wrk --threads N --connections N --duration 5s --script bench_api_mix.lua http://127.0.0.1:PORT -- TOKEN RUN
--
-- One connection per wrk thread (threads == connections), so a thread's requests go out one after
-- another: it blocks 10+RUN.THREAD.x.y/32, then unblocks it, then takes the next /32.  A CIDR no other
-- connection and no earlier run uses: a run stopped between block and unblock leaves its CIDR blocked, and
-- the next run must not meet it as a duplicate.  Prints one JSON line: answers that were 200 and those
-- that were not, socket errors, the run's length and its latency percentiles (microseconds).

local threads = {}

function setup(thread)
   table.insert(threads, thread)
   thread:set("index", #threads - 1)
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
   if status == 200 then
      ok = ok + 1
   else
      failed = failed + 1
      if #first < 200 then
         first = first .. status .. " "
      end
   end
end

function done(summary, latency, requests)
   local answered, refused, statuses = 0, 0, ""
   for _, thread in ipairs(threads) do
      answered = answered + thread:get("ok")
      refused = refused + thread:get("failed")
      statuses = statuses .. thread:get("first")
   end
   local errors = summary.errors
   io.write(string.format('{"ok": %d, "failed": %d, "first_failures": "%s", "socket_errors": %d, ' ..
                          '"duration_us": %d, "p50_us": %d, "p99_us": %d}\n',
                          answered, refused, statuses, errors.connect + errors.read + errors.write + errors.timeout,
                          summary.duration, latency:percentile(50), latency:percentile(99)))
end
