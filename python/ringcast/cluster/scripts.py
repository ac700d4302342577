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
-- KEYS: meta, stream base. ARGV: 1 src, 2 node, 3 inst, 4 epoch (0: claim), 5 conversation id,
-- 6 owner, 7 segment epoch, 8 created, 9 now, 10 session bytes, 11 keep ms (running),
-- 12 ttl ms (after the end), 13 start, 14 data start (> start: [start, data start) is a gap),
-- 15 state, 16 end reason, 17.. data entries.
local meta, base = KEYS[1], KEYS[2]
local src, epoch = ARGV[1], tonumber(ARGV[4])
local cur = redis.call('HMGET', meta, 'src', 'epoch', 'state', 'total', 'node', 'inst', 'first')
local old_node, old_inst = '', ''
if cur[1] ~= src then
  if epoch ~= 0 then
    if not cur[1] then return {4, 0, 0, 0, '', '', ''} end
    return {3, tonumber(cur[2]) or 0, 0, 0, '', '', cur[3] or ''}
  end
  if cur[3] == 'running' then
    old_node, old_inst = cur[5], cur[6]
    local old = base .. ':' .. cur[2]
    redis.call('XADD', old, marker_id(tonumber(cur[4]) or 0), 'e', 'replaced')
    redis.call('PEXPIRE', old, ARGV[12])
  end
  epoch = redis.call('HINCRBY', meta, 'epoch', 1)
  redis.call('HSET', meta, 'src', src, 'conv', ARGV[5], 'owner', ARGV[6], 'segepoch', ARGV[7],
    'created', ARGV[8], 'state', 'running', 'end', '', 'total', 0, 'first', 0, 'completed', 0)
  cur[3], cur[4], cur[7] = 'running', '0', '0'
else
  epoch = tonumber(cur[2])
end
if cur[3] ~= 'running' then
  return {2, epoch, tonumber(cur[4]) or 0, tonumber(cur[7]) or 0, old_node, old_inst, cur[3]}
end
redis.call('HSET', meta, 'node', ARGV[2], 'inst', ARGV[3])
local total, first = tonumber(cur[4]), tonumber(cur[7])
local start, dstart = tonumber(ARGV[13]), tonumber(ARGV[14])
if start ~= total then
  redis.call('PEXPIRE', meta, ARGV[11])
  return {1, epoch, total, first, old_node, old_inst, 'running'}
end
local s = base .. ':' .. epoch
if dstart > start then
  redis.call('XADD', s, n(start) .. '-1', 'g', n(dstart))
  if first == start then first = dstart end
  total = dstart
end
for i = 17, #ARGV do
  redis.call('XADD', s, n(total) .. '-1', 'd', ARGV[i])
  total = total + #ARGV[i]
end
local floor = total - tonumber(ARGV[10])
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
local state, reason = ARGV[15], ARGV[16]
if state ~= 'running' then
  redis.call('HSET', meta, 'state', state, 'end', reason, 'completed', ARGV[9])
  if reason == '' then reason = state end
  redis.call('XADD', s, marker_id(total), 'e', reason)
  redis.call('PEXPIRE', meta, ARGV[12])
  redis.call('PEXPIRE', s, ARGV[12])
else
  redis.call('PEXPIRE', meta, ARGV[11])
  redis.call('PEXPIRE', s, ARGV[11])
end
return {0, epoch, total, first, old_node, old_inst, state}
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
