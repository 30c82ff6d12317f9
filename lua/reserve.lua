-- Records the grants one gateway just computed for a batch of keys, as leases that the other
-- gateways' sync.lua calls subtract from the budget they share, and the gateway's offered
-- rate, which sets their shares.
--
-- KEYS[1]   hash of the group's leases: one field per flow key, with entries
--           "node,grant,time_us,interval_us,rate" separated by ";", one per gateway
-- ARGV[1]   node id of the calling gateway: letters, digits, ".", "_" or "-"
-- ARGV[2]   the gateway's sync interval in microseconds, an integer >= 1
-- ARGV[3]   time to live of the hash in milliseconds, an integer >= 1
-- ARGV[4..] triples: flow key, grant (packets), offered rate (packets per second), integers >= 0
--
-- Each key's field keeps the leases of other gateways younger than two of their intervals,
-- and replaces the caller's own lease with a new one stamped with the server's TIME.
--
-- Reply: the number of leases written.
-- Errors: a reply error naming the bad argument; nothing is written in that case.

local FIRST_TRIPLE = 4

-- Only plain digits: the lease string is read back with %d+, so "1e3" or "0x3e8" would be
-- stored as typed and misread.
local function is_digits(text)
  return text ~= nil and string.match(text, '^%d+$') ~= nil
end

local node = ARGV[1]
if not node or not string.match(node, '^[%w._-]+$') then
  return redis.error_reply('invalid node id ' .. tostring(node) .. ': expected letters, digits, ".", "_" or "-"')
end
if not is_digits(ARGV[2]) or tonumber(ARGV[2]) < 1 then
  return redis.error_reply('invalid interval ' .. tostring(ARGV[2]) .. ': expected an integer >= 1')
end
if not is_digits(ARGV[3]) or tonumber(ARGV[3]) < 1 then
  return redis.error_reply('invalid ttl ' .. tostring(ARGV[3]) .. ': expected an integer >= 1')
end
local interval_us = tonumber(ARGV[2])
local ttl_ms = tonumber(ARGV[3])
if #ARGV < FIRST_TRIPLE - 1 or (#ARGV - FIRST_TRIPLE + 1) % 3 ~= 0 then
  return redis.error_reply('invalid argument count ' .. #ARGV .. ': expected 3 plus triples of key, grant, rate')
end
for i = FIRST_TRIPLE, #ARGV, 3 do
  if not is_digits(ARGV[i + 1]) or not is_digits(ARGV[i + 2]) then
    return redis.error_reply('invalid grant or rate for key ' .. ARGV[i] .. ': expected two integers >= 0')
  end
end

local time = redis.call('TIME')
local now_us = tonumber(time[1]) * 1000000 + tonumber(time[2])

for i = FIRST_TRIPLE, #ARGV, 3 do
  local key = ARGV[i]
  local kept = {}
  local leases = redis.call('HGET', KEYS[1], key)
  if leases then
    for lease in string.gmatch(leases, '[^;]+') do
      -- The same anchored pattern as sync.lua, so both skip a malformed entry alike.
      local lease_node, _, granted_us, lease_interval_us =
          string.match(lease, '^([^,]+),(%d+),(%d+),(%d+),(%d+)$')
      if lease_node and lease_node ~= node
          and now_us - tonumber(granted_us) < 2 * tonumber(lease_interval_us) then
        kept[#kept + 1] = lease
      end
    end
  end
  -- '%d', because tostring() would print a 16-digit time as 1.7e+15 and lose digits.
  kept[#kept + 1] = string.format('%s,%s,%d,%d,%s', node, ARGV[i + 1], now_us, interval_us, ARGV[i + 2])
  redis.call('HSET', KEYS[1], key, table.concat(kept, ';'))
end

redis.call('PEXPIRE', KEYS[1], ttl_ms)
return (#ARGV - FIRST_TRIPLE + 1) / 3
