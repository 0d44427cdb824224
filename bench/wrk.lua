-- wrk script for bench/run.py: POSTs a JSON body with a bearer key and prints one line,
-- "BENCH_JSON {...}", with the run's counts and latency percentiles (microseconds).
--
-- Environment:
--   BENCH_BODY   file holding the request body (JSON)
--   BENCH_KEY    the key sent as "Authorization: Bearer ..."
--   BENCH_TIMED  "1": also time every request here and report raw percentiles. wrk's own
--                percentiles are "corrected" for coordinated omission before done() sees
--                them, which at one connection turns one 50 ms pause into dozens of
--                synthetic slow samples; the raw ones are what a sequential client sees.
--
--   BENCH_BODY=body.json BENCH_KEY=sk-... wrk -t1 -c1 -d5s -s bench/wrk.lua http://host/path

local body_path = os.getenv("BENCH_BODY") or error("BENCH_BODY is not set")
local body_file = assert(io.open(body_path, "rb"))
wrk.method = "POST"
wrk.body = body_file:read("*a")
body_file:close()
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. (os.getenv("BENCH_KEY") or error("BENCH_KEY is not set"))

local timed = os.getenv("BENCH_TIMED") == "1"
local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

if timed then
  local ffi = require("ffi")
  ffi.cdef([[
    typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
    int clock_gettime(int clock_id, bench_timespec *tp);
  ]])
  local CLOCK_MONOTONIC = 1
  local ts = ffi.new("bench_timespec")
  local function now_us()
    ffi.C.clock_gettime(CLOCK_MONOTONIC, ts)
    return tonumber(ts.tv_sec) * 1e6 + tonumber(ts.tv_nsec) / 1e3
  end

  local prepared, sent_at = nil, 0
  samples = {} -- global: done() reads it from each thread with thread:get()

  function init(args)
    prepared = wrk.format()
  end

  function request()
    sent_at = now_us()
    return prepared
  end

  function response(status, headers, body)
    samples[#samples + 1] = now_us() - sent_at
  end
end

local function raw_percentiles()
  local all = {}
  for _, thread in ipairs(threads) do
    for _, value in ipairs(thread:get("samples") or {}) do
      all[#all + 1] = value
    end
  end
  if #all == 0 then
    return ""
  end
  table.sort(all)
  local sum = 0
  for _, value in ipairs(all) do
    sum = sum + value
  end
  local function at(p)
    return all[math.max(1, math.ceil(p / 100 * #all))]
  end
  return string.format(
    ',"raw_count":%d,"raw_p50_us":%.1f,"raw_p90_us":%.1f,"raw_p99_us":%.1f,"raw_max_us":%.1f,"raw_mean_us":%.1f',
    #all, at(50), at(90), at(99), all[#all], sum / #all)
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%.0f,"duration_us":%.0f,"bytes":%.0f,' ..
    '"connect_errors":%.0f,"read_errors":%.0f,"write_errors":%.0f,"status_errors":%.0f,' ..
    '"timeouts":%.0f,"p50_us":%.1f,"p90_us":%.1f,"p99_us":%.1f,"max_us":%.1f,"mean_us":%.1f%s}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.max, latency.mean, raw_percentiles()))
end
