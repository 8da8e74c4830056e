"""Lua scripts of the Redis session store: each runs atomically on the server, so what it
checks and what it writes cannot interleave with another replica's commands."""

from __future__ import annotations

# KEYS[1] the lease. ARGV[1] the owner. Deletes the lease only if the owner still holds it.
RELEASE_LEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

# KEYS[1] the session hash. ARGV: field, value, ... Creates the hash only if the id is free.
CREATE_IF_ABSENT = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV))
return 1
"""

# KEYS[1] the session hash, KEYS[2] the action id's reservation, KEYS[3] the session's actions
# hash, KEYS[4] the session's action id list. ARGV[1] action id, ARGV[2] session id,
# ARGV[3] the action's JSON. Returns -1 unknown session, 0 id taken, 1 stored.
ADD_ACTION = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
if not redis.call('SET', KEYS[2], ARGV[2], 'NX') then return 0 end
redis.call('HSET', KEYS[3], ARGV[1], ARGV[3])
redis.call('RPUSH', KEYS[4], ARGV[1])
return 1
"""

# KEYS[1] the session's actions hash. ARGV[1] action id, ARGV[2] the new JSON, ARGV[3..] the
# expected states. Compare-and-set on the stored state; returns the stored JSON after the
# call (nil when the action is unknown).
TRANSITION_ACTION = """
local current = redis.call('HGET', KEYS[1], ARGV[1])
if not current then return false end
local state = cjson.decode(current)['state']
for i = 3, #ARGV do
  if state == ARGV[i] then
    redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
    return ARGV[2]
  end
end
return current
"""
