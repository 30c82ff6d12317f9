-- Adds one gateway's passed packets for a batch of keys, and returns for each key the fleet's
-- counts in the current and previous window and what the other gateways may still pass on
-- the grants they hold, so the agent can size this gateway's next grant.
--
-- Window ids come from the Redis server's clock (TIME), never from a gateway's, so every
-- gateway agrees on where a window starts.
--
-- KEYS[1], KEYS[2]  hashes holding the counts of one (rule, bucket) group for even and odd
--                   window ids. Each has a field "window" with the window id whose counts it
--                   contains, and a field "p:<flow key>" per key with its passed packets.
-- KEYS[3]           hash of the group's leases, written by reserve.lua: one field per flow
--                   key, "node,grant,time_us,interval_us,rate;..." for each gateway's last
--                   grant. All three names carry the same hash tag, so in Redis Cluster a
--                   call touches a single slot.
-- ARGV[1]           window length in microseconds, an integer >= 1
-- ARGV[2]           time to live of the window hashes in milliseconds, an integer >= 1
-- ARGV[3]           span in microseconds that the deltas were counted over, ending now (the
--                   time since the gateway's previous report), an integer >= 1
-- ARGV[4]           node id of the calling gateway, whose own lease is left out
-- ARGV[5..]         pairs: flow key, passed delta (an integer >= 0)
--
-- Reply: { now_us, window_id, then for each pair in order:
--          current_passed, previous_passed, others_outstanding, others_rate }
-- where now_us is the server time in microseconds. Counts of a window the hashes no longer
-- contain are 0. others_outstanding is what the other gateways' grants still allow, each
-- assumed spent evenly over its gateway's sync interval; others_rate is the sum of the
-- offered packets per second the other gateways reported within two of their intervals.
--
-- A delta whose span reaches back across the start of the current window is split: the
-- part counted before the boundary, in proportion to time, goes to the previous window.
-- Without the split, packets passed at the end of a window count in the next one, and a
-- gateway that holds the limit ends up passing less than it in every window.
--
-- Errors: a reply error naming the bad argument; nothing is written in that case.

local FIRST_PAIR = 5

local function is_count(value)
  return value ~= nil and value >= 0 and value == math.floor(value)
end

local window_us = tonumber(ARGV[1])
local ttl_ms = tonumber(ARGV[2])
local span_us = tonumber(ARGV[3])
local node = ARGV[4]
if not is_count(window_us) or window_us < 1 then
  return redis.error_reply('invalid window length ' .. tostring(ARGV[1]) .. ': expected an integer >= 1')
end
if not is_count(ttl_ms) or ttl_ms < 1 then
  return redis.error_reply('invalid ttl ' .. tostring(ARGV[2]) .. ': expected an integer >= 1')
end
if not is_count(span_us) or span_us < 1 then
  return redis.error_reply('invalid span ' .. tostring(ARGV[3]) .. ': expected an integer >= 1')
end
if not node or node == '' then
  return redis.error_reply('missing node id: expected ARGV[4]')
end
if (#ARGV - FIRST_PAIR + 1) % 2 ~= 0 then
  return redis.error_reply('invalid argument count ' .. #ARGV .. ': expected 4 plus pairs of key and passed delta')
end
for i = FIRST_PAIR, #ARGV, 2 do
  if not is_count(tonumber(ARGV[i + 1])) then
    return redis.error_reply('invalid delta for key ' .. ARGV[i] .. ': expected an integer >= 0')
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

-- Sums what the other gateways' leases on one key still allow, and their offered rates.
local function other_leases(leases)
  local outstanding, rate = 0, 0
  if not leases then
    return 0, 0
  end
  for lease in string.gmatch(leases, '[^;]+') do
    -- The same anchored pattern as reserve.lua, so both skip a malformed entry alike.
    local lease_node, grant, granted_us, interval_us, lease_rate =
        string.match(lease, '^([^,]+),(%d+),(%d+),(%d+),(%d+)$')
    if lease_node and lease_node ~= node then
      grant, granted_us, interval_us = tonumber(grant), tonumber(granted_us), tonumber(interval_us)
      local age_us = now_us - granted_us
      if age_us < interval_us then
        outstanding = outstanding + grant * (interval_us - age_us) / interval_us
      end
      if age_us < 2 * interval_us then
        rate = rate + tonumber(lease_rate)
      end
    end
  end
  return math.floor(outstanding), rate
end

local reply = { now_us, window_id }
for i = FIRST_PAIR, #ARGV, 2 do
  local key, passed = ARGV[i], tonumber(ARGV[i + 1])
  local field = 'p:' .. key
  local passed_before = math.floor(passed * before_us / span_us)
  if passed_before > 0 then
    redis.call('HINCRBY', previous_key, field, passed_before)
  end
  local current = redis.call('HINCRBY', current_key, field, passed - passed_before)
  local previous = 0
  if previous_valid then
    previous = tonumber(redis.call('HGET', previous_key, field)) or 0
  end
  local outstanding, rate = other_leases(redis.call('HGET', KEYS[3], key))
  reply[#reply + 1] = current
  reply[#reply + 1] = previous
  reply[#reply + 1] = outstanding
  reply[#reply + 1] = rate
end

redis.call('PEXPIRE', current_key, ttl_ms)
if before_us > 0 then
  redis.call('PEXPIRE', previous_key, ttl_ms)
end
return reply
