-- Shared by bench_api_mix.lua and bench_api_one.lua: the threads a script set up, and the JSON line its
-- done() prints for the Python side (answers the script counted as ok and as failed, the first failed
-- statuses, socket errors, the run's length and its latency percentiles in microseconds).

local report = {threads = {}}

function report.setup(thread)
   table.insert(report.threads, thread)
   return #report.threads - 1
end

function report.done(summary, latency)
   local answered, refused, statuses = 0, 0, ""
   for _, thread in ipairs(report.threads) do
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

-- Count an answer in the thread's ok or failed, keeping the first failed statuses (200 characters at most).
function report.count(good, status)
   if good then
      ok = ok + 1
   else
      failed = failed + 1
      if #first < 200 then
         first = first .. status .. " "
      end
   end
end

return report
