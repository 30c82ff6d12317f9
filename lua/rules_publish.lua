-- Publishes a gateway's whole rule set to the fleet under a new version number, unless the
-- fleet already has exactly this set, so agents that apply the same file do not bump the
-- version.
--
-- KEYS[1]  hash of the fleet's rule set, with fields version (integer), rules (JSON array of
--          rules with their ids), node (node id of the publisher) and time_ms (server time
--          of publication, in milliseconds since the Unix epoch)
-- ARGV[1]  the rule set as JSON, in the same serialization every agent uses
-- ARGV[2]  node id of the calling gateway: letters, digits, ".", "_" or "-"
-- ARGV[3]  version of the fleet's set the gateway last applied, an integer >= 0
--
-- The new version is one more than the larger of the stored version and ARGV[3], so a
-- gateway that republishes after Redis lost its data never goes back to an older number.
-- The hash never expires: it is the fleet's configuration, not a count.
--
-- Reply: {version, written (1, or 0 when the set was already stored), node, time_ms} of
-- the set stored after the call.
-- Errors: a reply error naming the bad argument; nothing is written in that case.

local node = ARGV[2]
if not node or not string.match(node, '^[%w._-]+$') then
  return redis.error_reply('invalid node id ' .. tostring(node) .. ': expected letters, digits, ".", "_" or "-"')
end
if not ARGV[3] or not string.match(ARGV[3], '^%d+$') then
  return redis.error_reply('invalid base version ' .. tostring(ARGV[3]) .. ': expected an integer >= 0')
end

local stored = redis.call('HMGET', KEYS[1], 'version', 'rules', 'node', 'time_ms')
local version = tonumber(stored[1]) or 0
if stored[2] == ARGV[1] and version > 0 then
  return {version, 0, stored[3] or '', tonumber(stored[4]) or 0}
end

local next_version = math.max(version, tonumber(ARGV[3])) + 1
local time = redis.call('TIME')
local now_ms = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
redis.call('HSET', KEYS[1], 'version', next_version, 'rules', ARGV[1], 'node', node, 'time_ms', now_ms)
return {next_version, 1, node, now_ms}
