#!lua name=analytics_engine_v1
-- AnalyticsEngine's Redis functions. Generated from analytics_engine.core.bus.functions;
-- load as the admin user: FUNCTION LOAD REPLACE (services may only FCALL).

local function publish(keys, argv)
  local field = argv[1]
  local n = #keys
  local length = {}
  for k = 1, n do
    if argv[1 + n + k] == '1' then
      length[k] = redis.call('XLEN', keys[k])
    end
  end
  for i = 2 * n + 2, #argv, 3 do
    local k = tonumber(argv[i])
    if k > 0 then
      if length[k] then
        redis.call('XADD', keys[k], '*', field, argv[i + 2])
        length[k] = length[k] + 1
      else
        redis.call('XADD', keys[k], 'MAXLEN', '~', argv[1 + k], '*', field, argv[i + 2])
      end
    end
    redis.call('PUBLISH', argv[i + 1], argv[i + 2])
  end
  local full = {}
  for k = 1, n do
    if length[k] and length[k] >= tonumber(argv[1 + k]) then
      full[#full + 1] = k
    end
  end
  return full
end

redis.register_function{function_name='ae_publish_v1', callback=publish}
