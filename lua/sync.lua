-- Adds one gateway's packet counts for a batch of keys, and returns the fleet-wide counts of
-- the current and the previous window, so the agent can compute each key's sliding-window
-- estimate with the same arithmetic the XDP program uses.
--
-- Window ids come from the Redis server's clock (TIME), never from a gateway's, so every
-- gateway agrees on where a window starts.
--
-- KEYS[1], KEYS[2]  hashes holding the counts of one (rule, bucket) group for even and odd
--                   window ids. Both names carry the same hash tag, so in Redis Cluster a call
--                   touches a single slot. Each hash has a field "window" with the window id
--                   it holds, and fields "p:<flow key>" (passed) and "o:<flow key>" (offered).
-- ARGV[1]           window length in microseconds, at least 1
-- ARGV[2]           time to live of both hashes in milliseconds (a few windows)
-- ARGV[3..]         triples: flow key, passed delta, offered delta (integers, at least 0)
--
-- Reply: { now_us, window_id, then for each triple in order:
--          current_passed, previous_passed, current_offered, previous_offered }
-- where now_us is the server time in microseconds. Counts of a window the hashes no longer
-- hold are 0.
--
-- Errors: a reply error naming the bad argument; nothing is written in that case.

local window_us = tonumber(ARGV[1])
local ttl_ms = tonumber(ARGV[2])
if not window_us or window_us < 1 or window_us ~= math.floor(window_us) then
  return redis.error_reply('invalid window length ' .. tostring(ARGV[1]) .. ': expected an integer >= 1')
end
if not ttl_ms or ttl_ms < 1 then
  return redis.error_reply('invalid ttl ' .. tostring(ARGV[2]) .. ': expected an integer >= 1')
end
if (#ARGV - 2) % 3 ~= 0 then
  return redis.error_reply('invalid argument count ' .. #ARGV .. ': expected 2 plus triples of key, passed, offered')
end
for i = 3, #ARGV, 3 do
  local passed, offered = tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
  if not passed or passed < 0 or not offered or offered < 0 then
    return redis.error_reply('invalid deltas for key ' .. ARGV[i] .. ': expected two integers >= 0')
  end
end

local time = redis.call('TIME')
local now_us = tonumber(time[1]) * 1000000 + tonumber(time[2])
local window_id = math.floor(now_us / window_us)

-- Even windows live in KEYS[1], odd ones in KEYS[2].
local current_key, previous_key = KEYS[1], KEYS[2]
if window_id % 2 == 1 then
  current_key, previous_key = KEYS[2], KEYS[1]
end

-- A hash that still holds an older window is reused for this one.
if tonumber(redis.call('HGET', current_key, 'window')) ~= window_id then
  redis.call('DEL', current_key)
  redis.call('HSET', current_key, 'window', window_id)
end
local previous_valid = tonumber(redis.call('HGET', previous_key, 'window')) == window_id - 1

local reply = { now_us, window_id }
for i = 3, #ARGV, 3 do
  local key, passed, offered = ARGV[i], tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
  reply[#reply + 1] = redis.call('HINCRBY', current_key, 'p:' .. key, passed)
  reply[#reply + 1] = 0
  reply[#reply + 1] = redis.call('HINCRBY', current_key, 'o:' .. key, offered)
  reply[#reply + 1] = 0
  if previous_valid then
    local previous = redis.call('HMGET', previous_key, 'p:' .. key, 'o:' .. key)
    reply[#reply - 2] = tonumber(previous[1]) or 0
    reply[#reply] = tonumber(previous[2]) or 0
  end
end

redis.call('PEXPIRE', current_key, ttl_ms)
return reply
