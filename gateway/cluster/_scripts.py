"""The cluster's Lua scripts: each is one atomic step in Redis (docs/cluster.md, "In Redis").

Keys come in as ``KEYS`` (the names built by :class:`~gateway.cluster._store.Keys`), values as
``ARGV``; every script works on many fixtures at once so a round costs one request whatever
the number of fixtures. Times are Redis's own (``TIME``), so instances' clocks do not matter.
"""

from __future__ import annotations

from typing import Final

#: KEYS: lease keys. ARGV: token, ttl (ms), then one mode per key: ``a`` acquire if free
#: (also asked for the leases the token holds: one that vanished is taken again), ``-`` do
#: not. A lease the token holds is renewed whatever the mode. Returns each key's holder (nil:
#: free).
LEASES: Final = """
local out = {}
for i, k in ipairs(KEYS) do
  local mode = ARGV[i + 2]
  local cur = redis.call('GET', k)
  if cur == ARGV[1] then
    redis.call('PEXPIRE', k, ARGV[2])
    out[i] = cur
  elseif ((not cur) or cur == '-') and mode == 'a' then
    redis.call('SET', k, ARGV[1], 'PX', ARGV[2])
    out[i] = ARGV[1]
  else
    out[i] = cur
  end
end
return out
"""

#: KEYS: lease keys. ARGV: token, ttl (ms). Gives up the ones this token holds; returns how
#: many. A released lease holds ``-`` (for ``ttl``) instead of vanishing: free for LEASES, but
#: not taken back by a late APPEND of its last holder (it takes only a lease that vanished).
RELEASE: Final = """
local n = 0
for _, k in ipairs(KEYS) do
  if redis.call('GET', k) == ARGV[1] then
    redis.call('SET', k, '-', 'PX', ARGV[2])
    n = n + 1
  end
end
return n
"""

#: The owner's appends, fenced: KEYS per fixture: lease, stream, meta. ARGV: token, maxlen,
#: instance, lease ttl (ms), then per fixture: epoch, state ('' = unchanged), detail, expect,
#: n, then n times seq, position ('' = none), received time, frame text. A lease that does not
#: exist any more (it expired while Redis was unreachable, or Redis lost its data) is taken
#: again for the token: nobody else holds it. A fixture whose lease another token holds gets
#: ``fenced`` and nothing of it is written; one whose stream has another epoch gets
#: ``epoch``; one whose stream's last entry is below *expect* (the last seq Redis confirmed to
#: this owner: Redis lost appends, restarted empty or failed over to a replica that lacked
#: them) gets ``behind:<last seq>`` and no frame of it is written (the owner appends the
#: missing ones first); else each frame becomes entry ``<seq>-0`` (an entry already there,
#: from a retry, is skipped: Redis refuses an id not above the last) and the reply is the last
#: seq written (0: none); meta's ``last`` keeps the stream's last seq (reading it from the
#: stream would copy the whole last frame). Streams are trimmed to about maxlen entries.
APPEND: Final = """
local token, maxlen, instance, ttl = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local a = 5
local out = {}
for g = 1, #KEYS / 3 do
  local lease, stream, meta = KEYS[3 * g - 2], KEYS[3 * g - 1], KEYS[3 * g]
  local epoch, state, detail = ARGV[a], ARGV[a + 1], ARGV[a + 2]
  local expect, n = tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4])
  a = a + 5
  local holder = redis.call('GET', lease)
  if not holder then
    redis.call('SET', lease, token, 'PX', ttl)
    holder = token
  end
  if holder ~= token then
    out[g] = 'fenced'
  else
    local cur = redis.call('HGET', meta, 'epoch')
    if cur and cur ~= epoch then
      out[g] = 'epoch'
    else
      if not cur then redis.call('HSET', meta, 'epoch', epoch) end
      if state ~= '' then
        redis.call('HSET', meta, 'state', state, 'detail', detail, 'owner', instance)
      end
      local top = 0
      if expect > 0 then
        -- The stream's last seq, as this script keeps it in meta (written with the entries,
        -- so a replica has both or neither); read from the stream only where meta lacks it.
        top = tonumber(redis.call('HGET', meta, 'last') or '-1')
        if top < 0 then
          top = 0
          local e = redis.call('XREVRANGE', stream, '+', '-', 'COUNT', 1)
          if e[1] then top = tonumber(string.match(e[1][1], '^(%d+)')) end
        end
      end
      local write = n
      if top < expect then
        out[g] = 'behind:' .. top
        write = 0
      end
      local last, lp, lt = 0, nil, nil
      for e = 0, write - 1 do
        local i = a + 4 * e
        local seq, p, t = ARGV[i], ARGV[i + 1], ARGV[i + 2]
        local ok = redis.pcall('XADD', stream, 'MAXLEN', '~', maxlen, seq .. '-0',
                               'p', p, 't', t, 'd', ARGV[i + 3])
        if type(ok) == 'table' and ok.err then
          -- An entry already there (a retried batch) is skipped; any other error (out of
          -- memory) fails the whole request: it is retried, the entries written are skipped.
          if not string.find(ok.err, 'equal or smaller', 1, true) then
            return redis.error_reply(ok.err)
          end
        else
          last = tonumber(seq)
          if p ~= '' then lp, lt = p, t end
        end
      end
      if lp then
        redis.call('HSET', meta, 'p', lp, 't', lt, 'last', last)
      elseif last > 0 then
        redis.call('HSET', meta, 'last', last)
      end
      if not out[g] then out[g] = last end
    end
  end
  a = a + 4 * n
end
return out
"""

#: KEYS: meta, stream of one fixture. Returns {epoch, last seq, last position, its time,
#: state, detail, owner} (nil where unknown): where a new owner goes on.
TAKEOVER: Final = """
local m = redis.call('HMGET', KEYS[1], 'epoch', 'p', 't', 'state', 'detail', 'owner')
local last = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)
local seq = false
if last[1] then seq = string.match(last[1][1], '^(%d+)') end
return {m[1], seq, m[2], m[3], m[4], m[5], m[6]}
"""

#: KEYS: per fixture its meta and stream. Returns per fixture {epoch, state, detail, owner,
#: first seq, last seq} (nil where unknown).
METAS: Final = """
local out = {}
for g = 1, #KEYS / 2 do
  local row = redis.call('HMGET', KEYS[2 * g - 1], 'epoch', 'state', 'detail', 'owner')
  local first = redis.call('XRANGE', KEYS[2 * g], '-', '+', 'COUNT', 1)
  local last = redis.call('XREVRANGE', KEYS[2 * g], '+', '-', 'COUNT', 1)
  row[5] = first[1] and string.match(first[1][1], '^(%d+)') or false
  row[6] = last[1] and string.match(last[1][1], '^(%d+)') or false
  out[g] = row
end
return out
"""

#: KEYS: the instances sorted set, the instances' info hash. ARGV: name, ttl (ms), info.
#: Renews this instance's heartbeat, forgets expired ones, returns the live names and infos.
HEARTBEAT: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
local gone = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)
for _, name in ipairs(gone) do redis.call('HDEL', KEYS[2], name) end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
local names = redis.call('ZRANGE', KEYS[1], 0, -1)
local out = {}
for i, name in ipairs(names) do
  out[i] = {name, redis.call('HGET', KEYS[2], name) or ''}
end
return out
"""

#: KEYS: the instances sorted set, the info hash. ARGV: name. A clean stop's goodbye.
LEAVE: Final = """
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
return 1
"""

#: KEYS: the connect-slot key. ARGV: spacing (ms). Reserves the next cluster-wide connect slot
#: (slots at least spacing apart) and returns the milliseconds to wait for it, as a string.
CONNECT: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local nxt = tonumber(redis.call('GET', KEYS[1]) or '0')
local slot = math.max(now, nxt)
local nxt_slot = slot + tonumber(ARGV[1])
-- Kept until well after the slot it reserves (a slow rate, a long queue of reservations).
redis.call('SET', KEYS[1], string.format('%.3f', nxt_slot), 'PX',
           math.floor(nxt_slot - now) + 60000)
return string.format('%.3f', slot - now)
"""

#: KEYS: one feed's on-demand sorted set. ARGV: ttl (ms), then the fixtures this instance
#: follows on demand. Refreshes them, forgets expired ones (their instance is gone), returns
#: every fixture followed on demand anywhere in the cluster.
DEMAND: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for i = 2, #ARGV do redis.call('ZADD', KEYS[1], now + tonumber(ARGV[1]), ARGV[i]) end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
return redis.call('ZRANGE', KEYS[1], 0, -1)
"""

#: Planned handovers (gateway/cluster/_handover.py). KEYS: per fixture its lease, its
#: handover key. ARGV: token, offer time (ms), then per fixture the value to write
#: (``offer:<successor>``). Writes each offer whose lease the token holds (replacing an older
#: offer, kept while a ``ready:`` answers it); returns per fixture the handover value now.
OFFER: Final = """
local out = {}
for g = 1, #KEYS / 2 do
  local lease, handover = KEYS[2 * g - 1], KEYS[2 * g]
  local cur = redis.call('GET', handover)
  if redis.call('GET', lease) == ARGV[1] and not (cur and string.sub(cur, 1, 6) == 'ready:') then
    redis.call('SET', handover, ARGV[g + 2], 'PX', ARGV[2])
    cur = ARGV[g + 2]
  end
  out[g] = cur or false
end
return out
"""

#: KEYS: handover keys. ARGV: the expected value, the new value, then ``-`` (delete) or
#: ``=`` (write, keeping the time to live). Changes each key that holds the expected value;
#: returns how many.
SWAP: Final = """
local n = 0
for _, k in ipairs(KEYS) do
  if redis.call('GET', k) == ARGV[1] then
    if ARGV[3] == '-' then
      redis.call('DEL', k)
    else
      redis.call('SET', k, ARGV[2], 'KEEPTTL')
    end
    n = n + 1
  end
end
return n
"""

#: KEYS: lease, handover key of one fixture. ARGV: the owner's token, the successor's token,
#: ttl (ms). The lease goes to the successor if the owner holds it and the successor said it
#: is in step (``ready:<successor token>``); the handover key is deleted. Returns 1 if handed
#: over, else 0.
TRANSFER: Final = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if redis.call('GET', KEYS[2]) ~= 'ready:' .. ARGV[2] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
redis.call('DEL', KEYS[2])
return 1
"""

#: KEYS: handover keys. Returns each one's value (nil: none).
HANDOVERS: Final = """
local out = {}
for i, k in ipairs(KEYS) do
  out[i] = redis.call('GET', k)
end
return out
"""
