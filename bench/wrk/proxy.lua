-- wrk through a forward proxy: absolute-form requests.
--
--   WRK_TARGET=http://127.0.0.1:18080/1k \
--     wrk -t1 -c64 -d10s --latency -s bench/wrk/proxy.lua http://127.0.0.1:13129/
--
-- wrk connects to the host of its URL argument (the proxy); the request
-- line carries the absolute URL of the origin (`GET http://origin/path
-- HTTP/1.1`), which is what a browser sends to an explicit proxy, and the
-- Host header names the origin.
local target = os.getenv("WRK_TARGET") or "http://127.0.0.1:18080/1k"
local authority = target:match("^%a+://([^/]+)")
if not authority then
   error("WRK_TARGET must be an absolute http:// URL, got " .. target)
end
wrk.path = target
wrk.headers["Host"] = authority
