-- Returns the fleet's rule set when it is newer than the one a gateway has: the check each
-- agent makes every tick, which costs one HGET while nothing changed.
--
-- KEYS[1]  hash of the fleet's rule set (see rules_publish.lua)
-- ARGV[1]  version the gateway has, an integer >= 0
--
-- Reply: {version, rules, node, time_ms} when the stored version is greater than ARGV[1];
-- otherwise {version, '', '', 0}, with version 0 when no set was ever published (or Redis
-- lost it).
-- Errors: a reply error naming the bad argument.

if not ARGV[1] or not string.match(ARGV[1], '^%d+$') then
  return redis.error_reply('invalid version ' .. tostring(ARGV[1]) .. ': expected an integer >= 0')
end

local version = tonumber(redis.call('HGET', KEYS[1], 'version')) or 0
if version <= tonumber(ARGV[1]) then
  return {version, '', '', 0}
end
local stored = redis.call('HMGET', KEYS[1], 'rules', 'node', 'time_ms')
return {version, stored[1] or '[]', stored[2] or '', tonumber(stored[3]) or 0}
