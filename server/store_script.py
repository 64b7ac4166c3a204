"""The state store's one write command: a Lua script that writes one bucket's sessions in order
(server/state_store.py stages and packs them), and how it is called."""

from __future__ import annotations

import hashlib
from typing import Any

from redis.exceptions import NoScriptError

# One call writes up to WRITES_PER_CALL sessions of one bucket (store_backend: a cluster's calls
# stay in one hash slot). KEYS[1] is this replica's marker for the bucket, which exists while
# the store keeps what the replica wrote (a Redis restarted empty, or flushed, has none; it
# expires with the sessions' TTL and every write renews it). KEYS[2..] are the sessions. ARGV
# is the TTL, a header of one line per session, "KIND BORN STEP" (kind "put" or "end"), then
# two values per session, its meta and its state (both empty for an end): the session at
# KEYS[i] has ARGV[2i - 1] and ARGV[2i]. Each state is its own value, not a slice of one joined
# payload: Redis makes a Lua string of every argument a call has, and slicing each session's
# bytes out of a joined payload made a second copy (Redis CPU per update of a 256-hidden LSTM,
# 4.4 KB, 256 a call, redis-server 7.0: 14.3 us sliced, 9.3 us as arguments). It returns
# {1 if the marker was missing, then per session 1: applied, 0: stale, or 2: not applied, the
# record needs its meta}. A put with an empty meta is an update: the meta (id, principal,
# model, fingerprint: 300 bytes, a quarter of a small model's record) is sent with a session's
# first write only, and again whenever the store no longer has it.
WRITES_PER_CALL = 256
WRITE_IN_ORDER = """
local ttl = ARGV[1]
local result = {0}
if redis.call('SET', KEYS[1], '1', 'NX') then result[1] = 1 end
redis.call('PEXPIRE', KEYS[1], ttl)
local i = 2
for kind, born_s, step_s in string.gmatch(ARGV[2], '(%a+) (%S+) (%d+)\\n') do
  local key, born, step = KEYS[i], tonumber(born_s), tonumber(step_s)
  local meta, state = ARGV[2 * i - 1], ARGV[2 * i]
  local stored = redis.call('HMGET', key, 'born', 'step', 'ended')
  local stored_born = tonumber(stored[1])
  local stale = false
  if stored_born then
    if born < stored_born then
      stale = true
    elseif born == stored_born then
      stale = stored[3] ~= false or (kind == 'put' and tonumber(stored[2]) > step)
    end
  end
  if stale then
    result[i] = 0
  elseif kind == 'put' and meta == '' then
    -- An update: step and state only, onto this incarnation's record, which holds the meta
    -- (only a whole put writes `born` without `ended`, and it writes the meta with it).
    if stored_born ~= born then
      result[i] = 2
    else
      redis.call('HSET', key, 'step', step_s, 'state', state)
      redis.call('PEXPIRE', key, ttl)
      result[i] = 1
    end
  else
    redis.call('DEL', key)
    if kind == 'end' then
      redis.call('HSET', key, 'born', born_s, 'step', step_s, 'ended', '1')
    else
      redis.call('HSET', key, 'born', born_s, 'step', step_s, 'meta', meta, 'state', state)
    end
    redis.call('PEXPIRE', key, ttl)
    result[i] = 1
  end
  i = i + 1
end
return result
"""


class WriteScript:
    """WRITE_IN_ORDER, called by its SHA1 (the script's 1.4 KB is not sent with every call) and
    loaded again where a store lost it."""

    def __init__(self) -> None:
        self._sha = hashlib.sha1(WRITE_IN_ORDER.encode()).hexdigest()
        self._loaded = False

    async def run(self, redis: Any, commands: list[tuple[object, ...]]) -> list:
        """Run WRITE_IN_ORDER once per command, in one pipeline, by its SHA1 (the script's 1.4 KB
        is not sent with every call); a store that lost its scripts (restarted, or a new shard)
        gets it again and the calls are sent again: they are idempotent."""
        for attempt in (1, 2):
            if not self._loaded:
                await redis.script_load(WRITE_IN_ORDER)  # on every shard of a cluster
                self._loaded = True
            pipe = redis.pipeline(transaction=False)
            for command in commands:
                pipe.evalsha(self._sha, *command)
            try:
                return await pipe.execute()
            except NoScriptError:
                self._loaded = False
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")
