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
-- ARGV[3]           span in microseconds that the deltas were counted over, ending now (the
--                   time since the gateway's previous report), at least 1
-- ARGV[4..]         triples: flow key, passed delta, offered delta (integers, at least 0)
--
-- Reply: { now_us, window_id, then for each triple in order:
--          current_passed, previous_passed, current_offered, previous_offered }
-- where now_us is the server time in microseconds. Counts of a window the hashes no longer
-- hold are 0.
--
-- A delta whose span reaches back across the start of the current window is split: the
-- part counted before the boundary, in proportion to time, goes to the previous window.
-- Without the split, packets passed at the end of a window count in the next one, and a
-- gateway that holds the limit ends up passing less than it in every window.
--
-- Errors: a reply error naming the bad argument; nothing is written in that case.

local FIRST_TRIPLE = 4
local window_us = tonumber(ARGV[1])
local ttl_ms = tonumber(ARGV[2])
local span_us = tonumber(ARGV[3])
if not window_us or window_us < 1 or window_us ~= math.floor(window_us) then
  return redis.error_reply('invalid window length ' .. tostring(ARGV[1]) .. ': expected an integer >= 1')
end
if not ttl_ms or ttl_ms < 1 or ttl_ms ~= math.floor(ttl_ms) then
  return redis.error_reply('invalid ttl ' .. tostring(ARGV[2]) .. ': expected an integer >= 1')
end
if not span_us or span_us < 1 or span_us ~= math.floor(span_us) then
  return redis.error_reply('invalid span ' .. tostring(ARGV[3]) .. ': expected an integer >= 1')
end
if #ARGV < FIRST_TRIPLE - 1 or (#ARGV - FIRST_TRIPLE + 1) % 3 ~= 0 then
  return redis.error_reply('invalid argument count ' .. #ARGV .. ': expected 3 plus triples of key, passed, offered')
end
for i = FIRST_TRIPLE, #ARGV, 3 do
  local passed, offered = tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
  if not passed or passed < 0 or passed ~= math.floor(passed)
      or not offered or offered < 0 or offered ~= math.floor(offered) then
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

-- A hash that contains another window's counts is cleared and reused for `id`.
local function claim(key, id)
  if tonumber(redis.call('HGET', key, 'window')) ~= id then
    redis.call('DEL', key)
    redis.call('HSET', key, 'window', id)
  end
end
claim(current_key, window_id)

-- Time of the span that fell before the current window started. The part of a delta
-- counted then is floor(delta * before_us / span_us), the formula the agent also uses.
local elapsed_us = now_us - window_id * window_us
local before_us = 0
if elapsed_us < span_us then
  before_us = span_us - elapsed_us
  claim(previous_key, window_id - 1)
end
local previous_valid = tonumber(redis.call('HGET', previous_key, 'window')) == window_id - 1

local reply = { now_us, window_id }
for i = FIRST_TRIPLE, #ARGV, 3 do
  local key, passed, offered = ARGV[i], tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
  local passed_before = math.floor(passed * before_us / span_us)
  local offered_before = math.floor(offered * before_us / span_us)
  if passed_before > 0 then
    redis.call('HINCRBY', previous_key, 'p:' .. key, passed_before)
  end
  if offered_before > 0 then
    redis.call('HINCRBY', previous_key, 'o:' .. key, offered_before)
  end
  reply[#reply + 1] = redis.call('HINCRBY', current_key, 'p:' .. key, passed - passed_before)
  reply[#reply + 1] = 0
  reply[#reply + 1] = redis.call('HINCRBY', current_key, 'o:' .. key, offered - offered_before)
  reply[#reply + 1] = 0
  if previous_valid then
    local previous = redis.call('HMGET', previous_key, 'p:' .. key, 'o:' .. key)
    reply[#reply - 2] = tonumber(previous[1]) or 0
    reply[#reply] = tonumber(previous[2]) or 0
  end
end

redis.call('PEXPIRE', current_key, ttl_ms)
if before_us > 0 then
  redis.call('PEXPIRE', previous_key, ttl_ms)
end
return reply
