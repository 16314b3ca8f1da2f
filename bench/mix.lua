-- The request mix of the server benchmark, one cycle of five requests per connection:
-- GET /api/me (UserInfoRequested), the bulk of 10 records (LogRecordsRequested) twice,
-- GET /api/me again, and a failing GET of an unknown dataset (404, ServerErrorFound).
-- bench/loadgen.py sends the same cycle when wrk is not installed.

local key = { ["X-Rubrix-Api-Key"] = "rubrix.apikey", ["User-Agent"] = "bench/1.0",
              ["Accept-Language"] = "en" }
local records = {}
for i = 1, 10 do
  records[i] = string.format('{"id": %d, "inputs": {"text": "benchmark record number %d"}}', i, i)
end
local body = '{"records": [' .. table.concat(records, ", ") .. ']}'
local bulk_headers = { ["Content-Type"] = "application/json" }
for name, value in pairs(key) do bulk_headers[name] = value end

local cycle = {}
local position = 0

init = function(args)
  cycle = {
    wrk.format("GET", "/api/me", key),
    wrk.format("POST", "/api/datasets/bench/TextClassification:bulk", bulk_headers, body),
    wrk.format("GET", "/api/me", key),
    wrk.format("POST", "/api/datasets/bench/TextClassification:bulk", bulk_headers, body),
    wrk.format("GET", "/api/datasets/unknown", key),
  }
end

request = function()
  position = position % #cycle + 1
  return cycle[position]
end

done = function(summary, latency, requests)
  local errors = summary.errors
  io.write(string.format(
    '{"requests": %d, "duration_s": %.6f, "rps": %.1f, "socket_errors": %d, "non_2xx": %d, "p50_ms": %.3f, "p99_ms": %.3f}\n',
    summary.requests, summary.duration / 1e6, summary.requests / (summary.duration / 1e6),
    errors.connect + errors.read + errors.write + errors.timeout, errors.status,
    latency:percentile(50) / 1000, latency:percentile(99) / 1000))
end
