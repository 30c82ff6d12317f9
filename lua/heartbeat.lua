-- Records that a gateway is alive and returns how many gateways were seen recently, which
-- the agents use to split a limit while they cannot reach Redis.
--
-- KEYS[1]  sorted set of gateway ids, scored by the server time of their last heartbeat
-- ARGV[1]  this gateway's id (node id)
-- ARGV[2]  how long a gateway counts as alive after its last heartbeat, in milliseconds
--
-- Reply: the number of gateways alive, this one included (an integer >= 1).

local alive_ms = tonumber(ARGV[2])
if not alive_ms or alive_ms < 1 then
  return redis.error_reply('invalid alive time ' .. tostring(ARGV[2]) .. ': expected an integer >= 1')
end

local time = redis.call('TIME')
local now_ms = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)

redis.call('ZADD', KEYS[1], now_ms, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now_ms - alive_ms)
redis.call('PEXPIRE', KEYS[1], alive_ms)
return redis.call('ZCARD', KEYS[1])
