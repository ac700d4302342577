"""The Lua scripts that make each session's changes atomic in Redis.

Every script touches only the keys of one session (one hash slot: the ``{…}`` tag), so it runs
on one Redis Cluster shard. Numbers are formatted with ``%d``: Lua's default formatting of a
number would turn a large offset into ``1e+15``.
"""

from __future__ import annotations

# Status codes of SYNC's reply (first element).
SYNC_OK = 0
SYNC_RESYNC = 1  # the mirror's start offset is not Redis' total: send from `total` instead
SYNC_ENDED = 2  # the session is no longer running in Redis (cancelled elsewhere, node lost)
SYNC_REPLACED = 3  # another producer claimed the session since
SYNC_GONE = 4  # the session's keys are gone (expired, Redis restarted empty): claim again

_COMMON = """
local function n(x) return string.format('%d', x) end
local function marker_id(total) if total == 0 then return '0-1' end return n(total) .. '-0' end
"""

SYNC = (
    _COMMON
    + """
-- One call syncs a batch of sessions: KEYS = meta1, stream base1, meta2, base2, ... and ARGV =
-- n1, <n1 arguments of session 1>, n2, <...>. (In a Redis Cluster a batch is one session: a
-- script's keys must share a slot.) A session's arguments: a header of fields joined by \x1f
-- (one argument instead of fourteen: the client's cost is per argument), the conversation id
-- and the owner (only read by a claim), then the data entries. Header fields: 1 src, 2 node,
-- 3 inst, 4 epoch (0: claim), 5 segment epoch, 6 created, 7 now, 8 session bytes, 9 keep ms
-- (expiry while running; 0: leave it), 10 ttl ms (after the end), 11 start, 12 data start
-- (> start: [start, data start) is a gap), 13 state, 14 end reason. Reply: one {status, epoch,
-- total, first, replaced node, its instance, state, tailed} per session (tailed: 1 while
-- another node's tail marks the session, key <meta without its m>t).
local function split(s)
  local t, i = {}, 1
  while true do
    local j = string.find(s, '\\31', i, true)
    if not j then t[#t + 1] = string.sub(s, i); return t end
    t[#t + 1] = string.sub(s, i, j - 1)
    i = j + 1
  end
end

local function sync(meta, base, off, nargs)
  local h = split(ARGV[off + 1])
  local conv, owner = ARGV[off + 2], ARGV[off + 3]
  local function a(k) return h[k] end
  local src, epoch = a(1), tonumber(a(4))
  local cur = redis.call('HMGET', meta, 'src', 'epoch', 'state', 'total', 'node', 'inst', 'first')
  local old_node, old_inst = '', ''
  local keep = tonumber(a(9))
  if cur[1] ~= src then
    if epoch ~= 0 then
      if not cur[1] then return {4, 0, 0, 0, '', '', '', 0} end
      return {3, tonumber(cur[2]) or 0, 0, 0, '', '', cur[3] or '', 0}
    end
    if cur[3] == 'running' then
      old_node, old_inst = cur[5], cur[6]
      local old = base .. ':' .. cur[2]
      redis.call('XADD', old, marker_id(tonumber(cur[4]) or 0), 'e', 'replaced')
      redis.call('PEXPIRE', old, a(10))
    end
    epoch = redis.call('HINCRBY', meta, 'epoch', 1)
    redis.call('HSET', meta, 'src', src, 'conv', conv, 'owner', owner, 'segepoch', a(5),
      'created', a(6), 'state', 'running', 'end', '', 'total', 0, 'first', 0, 'completed', 0)
    cur[3], cur[4], cur[6], cur[7] = 'running', '0', false, '0'
  else
    epoch = tonumber(cur[2])
  end
  if cur[3] ~= 'running' then
    return {2, epoch, tonumber(cur[4]) or 0, tonumber(cur[7]) or 0, old_node, old_inst, cur[3], 0}
  end
  if cur[6] ~= a(3) then redis.call('HSET', meta, 'node', a(2), 'inst', a(3)) end
  local total, first = tonumber(cur[4]), tonumber(cur[7])
  local start, dstart = tonumber(a(11)), tonumber(a(12))
  if start ~= total then
    return {1, epoch, total, first, old_node, old_inst, 'running', 0}
  end
  local s = base .. ':' .. epoch
  if dstart > start then
    redis.call('XADD', s, n(start) .. '-1', 'g', n(dstart))
    if first == start then first = dstart end
    total = dstart
  end
  for i = 4, nargs do
    local d = ARGV[off + i]
    redis.call('XADD', s, n(total) .. '-1', 'd', d)
    total = total + #d
  end
  local floor = total - tonumber(a(8))
  if floor > first then
    redis.call('XTRIM', s, 'MINID', n(floor))
    local head = redis.call('XRANGE', s, '-', '+', 'COUNT', 1)
    if #head == 0 then
      first = total
    else
      first = tonumber(string.match(head[1][1], '^(%d+)'))
      if head[1][2][1] == 'g' then first = tonumber(head[1][2][2]) end
    end
  end
  redis.call('HSET', meta, 'total', n(total), 'first', n(first))
  local state, reason = a(13), a(14)
  if state ~= 'running' then
    redis.call('HSET', meta, 'state', state, 'end', reason, 'completed', a(7))
    if reason == '' then reason = state end
    redis.call('XADD', s, marker_id(total), 'e', reason)
    redis.call('PEXPIRE', meta, a(10))
    redis.call('PEXPIRE', s, a(10))
  elseif keep > 0 then
    redis.call('PEXPIRE', meta, keep)
    redis.call('PEXPIRE', s, keep)
  end
  local tailed = redis.call('EXISTS', string.sub(meta, 1, -2) .. 't')
  return {0, epoch, total, first, old_node, old_inst, state, tailed}
end

local out, off = {}, 0
for k = 1, #KEYS / 2 do
  local nargs = tonumber(ARGV[off + 1])
  out[k] = sync(KEYS[2 * k - 1], KEYS[2 * k], off + 1, nargs)
  off = off + 1 + nargs
end
return out
"""
)

END = (
    _COMMON
    + """
-- End a running session from outside its producer: a DELETE on another node (ARGV 3 =
-- 'cancelled') or a reader that found the producing node's lease gone (ARGV 3 = 'node_lost',
-- only if the session is still that node instance's: ARGV 5, 6). KEYS: meta, stream base.
-- ARGV: 1 now, 2 ttl ms, 3 reason, 4 state, 5 node, 6 inst.
-- Reply: {1, node, inst, epoch} if it ended it, {0} if it was not running (or not that
-- instance's), {-1} if there is no such session.
local meta, base = KEYS[1], KEYS[2]
local cur = redis.call('HMGET', meta, 'state', 'node', 'inst', 'epoch', 'total')
if not cur[1] then return {-1} end
if cur[1] ~= 'running' then return {0} end
if ARGV[5] ~= '' and (cur[2] ~= ARGV[5] or cur[3] ~= ARGV[6]) then return {0} end
redis.call('HSET', meta, 'state', ARGV[4], 'end', ARGV[3], 'completed', ARGV[1])
local s = base .. ':' .. cur[4]
redis.call('XADD', s, marker_id(tonumber(cur[5]) or 0), 'e', ARGV[3])
redis.call('PEXPIRE', meta, ARGV[2])
redis.call('PEXPIRE', s, ARGV[2])
return {1, cur[2] or '', cur[3] or '', tonumber(cur[4])}
"""
)

FORGET = """
-- Remove a finished session (a DELETE of a stream that is no longer running). KEYS: meta,
-- stream base. Reply: 1 if it existed.
local e = redis.call('HGET', KEYS[1], 'epoch')
if not e then return 0 end
redis.call('DEL', KEYS[1], KEYS[2] .. ':' .. e)
return 1
"""

ACK = """
-- A Durable Stream's owning node records what it answered a writer with (a create's 201, an
-- append's answer): ds.acked = <total>:<closed>:<src>, so that other nodes wait for the
-- mirror to bring that much (ringcast.server.cluster.ds). Two appends answered by different
-- processes may send theirs in either order: a record of the same incarnation that is not
-- behind this one is kept. KEYS: meta. ARGV: 1 total, 2 closed (0 or 1), 3 src, 4 expiry ms
-- for a hash that has none (it vanished meanwhile; the mirror's claim sets the real one).
-- Reply: 1 if recorded.
local cur = redis.call('HGET', KEYS[1], 'ds.acked')
if cur then
  local t, c, s = string.match(cur, '^(%d+):(%d):(.*)$')
  if s == ARGV[3] and (tonumber(t) > tonumber(ARGV[1])
      or (tonumber(t) == tonumber(ARGV[1]) and c >= ARGV[2])) then
    return 0
  end
end
redis.call('HSET', KEYS[1], 'ds.acked', ARGV[1] .. ':' .. ARGV[2] .. ':' .. ARGV[3])
if redis.call('PTTL', KEYS[1]) == -1 then redis.call('PEXPIRE', KEYS[1], ARGV[4]) end
return 1
"""
