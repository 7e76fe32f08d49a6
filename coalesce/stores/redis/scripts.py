"""The Redis store's key layout and Lua scripts: pure data and pure functions, no I/O.

Key layout. The cache hands the store full keys, namespace first (`ns:user:42`). In Redis the
part after the namespace is wrapped in braces, so that it is the key's Redis Cluster hash tag
and every key belonging to one cache key lives on one slot:

    ns:{user:42}            the entry (bytes written by `encode_entry`)
    ns:{user:42}:lease      the cross-process lease: a random token, SET NX PX
    ns:{user:42}:failed     a short-lived failure marker: "<lease token>|<msgpack [type, msg]>"
    ns:{user:42}:waiters    "someone waits for this lease" (set by CLAIM, PX = 2 lease ms)
    ns:{user:42}:handed     "<lease token>|<entry>": a result that could not be stored,
                            for the waiters that saw that lease (see `HAND`)
    ns:{user:42}:done       the wake-up channel (pub/sub), published when a lease ends
    ns:tag:{user:42}        a tag's sorted set: member = full key, score = expiry (ms) of
                            the entry, or of the lease of its computation in flight
    ns:__invalidate__       the invalidation channel of near caches ("k:<key>" / "t:<tag>")

Entry keys are exactly the keys `ns:{...}` that end with `}`; everything else under `ns:` is a
sibling, so `keys()` can tell them apart without reading them. (A key whose part after the
namespace is empty or starts with `}` has no usable hash tag: on a cluster its siblings may
then lie on other slots.)

Wake-up messages on `...:done`: a one-byte marker (`s` stored, `d` deleted, `r` released,
`f` failed, `h` handed), except when a leader's `STORE` ends a lease that somebody waits
for and the entry is at most `PUSH_MAX` bytes: then the message carries the entry itself,
`v<lease token>|<entry bytes>`, and a waiter of that very lease takes it without asking Redis
again (`pushed_entry`). A marker, a foreign token or unreadable bytes mean: check Redis.
Every process of the namespace receives every message (one pattern subscription each), which
is why `STORE` publishes only when a waiter asked for it (`...:waiters`; a miss nobody waits
for publishes nothing), and pushes only small values. No waiter can miss its wake-up: the
flag is set by the same `CLAIM` that tells it to wait, so a `STORE` either runs after it (and
publishes) or before it (and that `CLAIM`, checking the entry first, returns the entry); the
flag outlives every wait (two lease times, a wait is at most one lease time and 5 ms), and
every wait is bounded anyway, after which the waiter claims again.

Scripts. Every decision that must be atomic on the server is one script, run with EVALSHA
(loaded on NOSCRIPT). They touch only the keys they are given, all on one slot, so they run
unchanged on Redis Cluster; PUBLISH from a script is broadcast to the whole cluster.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import msgpack  # type: ignore[import-untyped]

__all__ = [
    "CLAIM",
    "CLAIM_CHECK",
    "CLAIM_MANY",
    "CLAIM_ONLY",
    "CLAIM_REFRESH",
    "DELETE",
    "FAIL",
    "HAND",
    "PUSH_MAX",
    "RELEASE",
    "RENEW",
    "STORE",
    "STORE_MANY",
    "TAG",
    "TAKE_TAG",
    "KeyLayout",
    "Script",
    "decode_failure",
    "encode_failure",
    "glob_escape",
    "pushed_entry",
]

#: Entries up to this many bytes travel in the wake-up message itself (see the module doc).
PUSH_MAX = 64 * 1024

#: The modes of `CLAIM` (its ARGV[3]): check the entry first, only claim, refresh early.
CLAIM_CHECK, CLAIM_ONLY, CLAIM_REFRESH = "1", "0", "r"


@dataclass(frozen=True)
class Script:
    """A Lua script and its SHA1, run with EVALSHA and loaded on NOSCRIPT."""

    name: str
    source: str
    sha: str

    @classmethod
    def of(cls, name: str, source: str) -> Script:
        return cls(name, source, hashlib.sha1(source.encode()).hexdigest())


# Records `member` (a full key, expiring at `score` ms, or +inf) in the tag set `tagkey`,
# drops members that expired before `now` and lets the set expire with its last member.
# `raise_only`: keep a higher score already there (a computation in flight records its key
# with the lease's expiry, and nothing may shorten that while the lease runs).
_ADD_TAG = """
local function score_of(text)
  if text == 'inf' or text == '+inf' then return math.huge end
  return tonumber(text)
end
local function add_tag(tagkey, member, score, now, raise_only)
  if redis.call('TYPE', tagkey)['ok'] ~= 'zset' then redis.call('DEL', tagkey) end
  local current = raise_only and redis.call('ZSCORE', tagkey, member)
  if not current or score_of(current) < score_of(score) then
    redis.call('ZADD', tagkey, score, member)
  end
  redis.call('ZREMRANGEBYSCORE', tagkey, '-inf', '(' .. now)
  local last = redis.call('ZRANGE', tagkey, -1, -1, 'WITHSCORES')
  if last[2] == 'inf' then
    redis.call('PERSIST', tagkey)
  elseif last[2] then
    redis.call('PEXPIREAT', tagkey, last[2])
  end
end
"""

#: KEYS: entry, lease, waiters, then (only for a caller that has seen a lease holder: its
#: `tokens` below are not empty) failed, handed, then the tag sets. ARGV: token, lease ms,
#: mode (`CLAIM_CHECK` "1", `CLAIM_ONLY` "0", `CLAIM_REFRESH` "r"), then (for such a caller)
#: the lease token it waited for last ("" for a foreign one) and every lease token it has
#: seen (space-separated), then (only with tag sets) member (full key), lease expiry (ms, the
#: tag score), now ms. So a first claim without tags sends three KEYS and three ARGV; the
#: script tells the layouts apart by the ARGV count (3, 5, 6 or 8).
#: Returns 1 (the lease is taken) | the entry's bytes | {"handed", bytes} | {"failed",
#: marker} | {"wait", holder, pttl}: the common replies are the cheapest to send and parse.
#: "handed": the entry computed under one of the seen leases, which could not be stored (an
#: invalidation came after that computation began), see `HAND`.
#: Mode "1" (check) reports the entry (fresh or not: the caller decides, and claims again
#: with mode "0" when it is not) before anything else, so a leader's first claim is also
#: its check again: an entry stored just before it is found, never computed twice. A value
#: of another type under the entry's name is reported as unreadable bytes (a miss).
#: Mode "r" (early refresh: the caller holds a fresh entry and wants it recomputed) takes a
#: free lease whatever is stored; when the lease is held (somebody refreshes already) it
#: reports the stored entry instead of waiting, and waits as mode "0" when there is none.
#: The failure marker is reported only to a waiter that saw the failed leader's token, so a
#: caller arriving after a failure computes afresh instead of inheriting the error. A caller
#: told to wait also flags the lease as waited for (for two lease times, longer than any
#: wait), so that its `STORE` publishes the wake-up (with the entry when small).
#: A caller taking the lease records the key in the tag sets of the entry it will compute
#: (score: the lease's expiry), so that a `delete_tag` from now on deletes the lease too and
#: fences the computation. (On a cluster the tag sets lie on other slots: no tag KEYS here,
#: `TAG` records them right after.)
#: A foreign lease is nobody's computation: a value that is not one of our tokens (other
#: bytes, another type), or a lease without expiry or with more than 100 lease times left
#: (ours always expire within one lease time unless renewed). Its expiry is cut to one lease
#: time (the caller's), so that a waiter takes it over within that bound; the holder reported
#: for a foreign value is "" (nobody whose failure or pushed entry to accept).
CLAIM = Script.of(
    "claim",
    _ADD_TAG
    + """
local n = (#ARGV == 5 or #ARGV == 8) and 5 or 3  -- KEYS (and ARGV) before the tags' ones
if ARGV[3] == '1' then
  local value = redis.pcall('GET', KEYS[1])
  if type(value) == 'table' then return 'foreign type' end  -- WRONGTYPE: a miss
  if value then return value end
end
if n == 5 then
  local handed = redis.pcall('GET', KEYS[5])
  if type(handed) == 'string' and string.sub(handed, 33, 33) == '|'
      and string.find(' ' .. ARGV[5] .. ' ', ' ' .. string.sub(handed, 1, 32) .. ' ', 1, true) then
    return {'handed', string.sub(handed, 34)}
  end
  if ARGV[4] ~= '' then
    local failed = redis.pcall('GET', KEYS[4])  -- a foreign type under it: no marker
    if type(failed) == 'string' and string.sub(failed, 1, #ARGV[4] + 1) == ARGV[4] .. '|' then
      return {'failed', failed}
    end
  end
end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then  -- the lease was free
  for i = n + 1, #KEYS do add_tag(KEYS[i], ARGV[n + 1], ARGV[n + 2], ARGV[n + 3], true) end
  return 1
end
local holder = redis.pcall('GET', KEYS[2])
local pttl = redis.call('PTTL', KEYS[2])
local ms = tonumber(ARGV[2])
if type(holder) ~= 'string' or #holder ~= 32 or not string.match(holder, '^%x+$') then
  holder = ''  -- not a token of ours: nobody's computation, nobody to hear from
end
if pttl < 0 or pttl > ms * 100 or (holder == '' and pttl > ms) then
  redis.call('PEXPIRE', KEYS[2], ms)  -- a foreign lease: over within one lease time
  pttl = ms
end
if ARGV[3] == 'r' then
  local value = redis.pcall('GET', KEYS[1])
  if type(value) == 'string' then return value end  -- somebody refreshes it
end
redis.call('SET', KEYS[3], '1', 'PX', 2 * ms)  -- outlasts this caller's wait (<= pttl + 5 ms)
return {'wait', holder, pttl}
""",
)

#: KEYS: entry, lease, waiters, handed, tag sets... ARGV: token ("" = no lease check), data,
#: px ("0" = no expiry), handed ms, then (only with tag sets) member (full key), tag score,
#: now ms. The wake-up channel is the entry's `...:done`.
#: The fence: with a token, the entry is written only while the lease is still ours; a
#: `DELETE` removes the lease with the entry, so a computation that began before an
#: invalidation cannot store after it (and a fenced leader publishes nothing). A wake-up is
#: published only when somebody waits: for the lease (flagged by `CLAIM`; the message carries
#: the entry when it is at most `PUSH_MAX` bytes, else the marker `s`), or, for a plain write
#: (no token), for any lease of the key (the marker `s`); nobody waiting, nothing is published.
#: The tag scores become the entry's expiry; without a token they are only raised while
#: somebody holds the lease (its computation's membership must last as long as the lease).
#: A refused store still hands the entry to the lease's waiters (as `HAND` does).
#: Returns 1 if stored, else 0.
STORE = Script.of(
    "store",
    _ADD_TAG
    + """
local waited = false
if ARGV[1] ~= '' then
  if redis.call('GET', KEYS[2]) ~= ARGV[1] then
    if redis.call('EXISTS', KEYS[3]) == 1 then
      redis.call('SET', KEYS[4], ARGV[1] .. '|' .. ARGV[2], 'PX', ARGV[4])
      redis.call('PUBLISH', KEYS[1] .. ':done', 'h')
    end
    return 0
  end
  waited = redis.call('DEL', KEYS[2], KEYS[3]) == 2  -- our lease, and the waiters' flag?
else
  waited = redis.call('EXISTS', KEYS[3]) == 1  -- a plain set while somebody waits for a lease
end
if ARGV[3] == '0' then
  redis.call('SET', KEYS[1], ARGV[2])
else
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
end
if #KEYS > 4 then  -- a plain set only raises the scores while somebody computes
  local raise_only = ARGV[1] == '' and redis.call('EXISTS', KEYS[2]) == 1
  for i = 5, #KEYS do add_tag(KEYS[i], ARGV[5], ARGV[6], ARGV[7], raise_only) end
end
if waited and ARGV[1] ~= '' and #ARGV[2] <= PUSH_MAX then
  redis.call('PUBLISH', KEYS[1] .. ':done', 'v' .. ARGV[1] .. '|' .. ARGV[2])
elseif waited then
  redis.call('PUBLISH', KEYS[1] .. ':done', 's')
end
return 1
""".replace("PUSH_MAX", str(PUSH_MAX)),
)

#: KEYS: one tag set. ARGV: "1" to only raise scores (else set them), now ms, then member,
#: score pairs. On a cluster, where tag sets lie on other slots than their entries, this
#: records what `CLAIM`, `RENEW` and `STORE` record themselves on one server; `delete_tag`
#: also uses it to put back members it could not delete. Returns 1.
TAG = Script.of(
    "tag",
    _ADD_TAG
    + """
for i = 3, #ARGV, 2 do add_tag(KEYS[1], ARGV[i], ARGV[i + 1], ARGV[2], ARGV[1] == '1') end
return 1
""",
)

#: KEYS: one tag set, its "taking" set (same slot). Moves the tag set's members (and scores)
#: into the taking set and returns all of the taking set's, in one step: a computation that
#: records itself after this lands in a new tag set, seen by the next `delete_tag`, and none
#: is removed from the tag set while its lease may still be running. Members stay in the
#: taking set until `delete_tag` has deleted their entries (it removes them batch by batch),
#: so an invalidation that fails half-way (a timeout after this ran) leaves them to the next
#: one instead of losing them. The taking set expires with its last member. A foreign value
#: of another type under either name is deleted (as `add_tag` does).
TAKE_TAG = Script.of(
    "take_tag",
    """
for _, key in ipairs(KEYS) do
  local kind = redis.call('TYPE', key)['ok']
  if kind ~= 'zset' and kind ~= 'none' then redis.call('DEL', key) end
end
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('ZUNIONSTORE', KEYS[2], 2, KEYS[2], KEYS[1], 'AGGREGATE', 'MAX')
  redis.call('DEL', KEYS[1])
end
local members = redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES')
local last = members[#members]
if last == 'inf' then
  redis.call('PERSIST', KEYS[2])
elseif last then
  redis.call('PEXPIREAT', KEYS[2], math.ceil(tonumber(last)))
end
return members
""",
)

#: KEYS: entry1, lease1, entry2, lease2, ... (one slot). ARGV: invalidation channel or "",
#: message. Deletes entries and leases (fencing computations in flight), wakes the waiters
#: of every deleted lease so one of them computes afresh, and returns how many entries existed.
DELETE = Script.of(
    "delete",
    """
local n = 0
for i = 1, #KEYS, 2 do
  n = n + redis.call('DEL', KEYS[i])
  if redis.call('DEL', KEYS[i + 1]) == 1 then
    redis.call('PUBLISH', KEYS[i] .. ':done', 'd')
  end
end
if ARGV[1] ~= '' then redis.call('PUBLISH', ARGV[1], ARGV[2]) end
return n
""",
)

#: KEYS: lease. ARGV: token, channel. Ends our lease (if still ours) and wakes the waiters.
#: Returns 1 if it was ours, else 0.
RELEASE = Script.of(
    "release",
    """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.call('PUBLISH', ARGV[2], 'r')
  return 1
end
return 0
""",
)

#: KEYS: lease, waiters, handed. ARGV: token, entry bytes, channel, handed ms.
#: A leader whose result may not be stored (an invalidation reached it while it computed):
#: * its lease was deleted (by that invalidation): when somebody waits, it hands the entry
#:   to the waiters instead of storing it: `...:handed` = "<token>|<entry>" (the latest such
#:   entry of the key), announced by the marker `h`. A waiter that saw that token in a
#:   `CLAIM` reply takes it: that computation began after every invalidation the waiter's
#:   callers must respect (any older lease was deleted by them), so an invalidation storm,
#:   deleting every lease before its computation ends, cannot keep waiters from an answer
#:   (issue 9, item 1). Returns 1.
#: * its lease is still its own (the invalidation that fenced it in its process did not
#:   delete it: its DELETE failed, or a Cluster tag invalidation missed a lease recorded
#:   after the claim): the entry is not handed, since waiters that arrived after that
#:   invalidation would take it; the lease ends and the waiters are woken to compute
#:   (`r`). Returns 0.
HAND = Script.of(
    "hand",
    """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.call('PUBLISH', ARGV[3], 'r')
  return 0
end
if redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('SET', KEYS[3], ARGV[1] .. '|' .. ARGV[2], 'PX', ARGV[4])
  redis.call('PUBLISH', ARGV[3], 'h')
end
return 1
""",
)

#: KEYS: lease, failed. ARGV: token, marker, marker ms, channel. The leader's computation
#: raised: leave a short-lived marker for the waiters, end the lease and wake them. Returns 1
#: if the lease was still ours, else 0 (nothing written).
FAIL = Script.of(
    "fail",
    """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
  redis.call('DEL', KEYS[1])
  redis.call('PUBLISH', ARGV[4], 'f')
  return 1
end
return 0
""",
)

#: KEYS: lease, tag sets... ARGV: token, lease ms, member, lease expiry (ms), now ms.
#: Extends our lease while we compute, and the key's membership in its tag sets with it.
#: Returns 1 while the lease is ours, else 0 (the renewer stops, see `steps.after_renewal`).
RENEW = Script.of(
    "renew",
    _ADD_TAG
    + """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  for i = 2, #KEYS do add_tag(KEYS[i], ARGV[3], ARGV[4], ARGV[5], true) end
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
""",
)


#: Batches (`RedisStore.fill_many`, `Cache.cached_many`): `CLAIM` and `STORE` for many keys in
#: one round trip, all on one slot (a cluster runs one per slot group).
#: KEYS: per key: entry, lease, waiters, then its tag sets (none on a cluster).
#: ARGV: lease ms, mode (`CLAIM_CHECK` "1" or `CLAIM_ONLY` "0"), lease expiry (ms, the tag
#: score), now ms, then per key: its tag count, token, member (full key).
#: Returns one reply per key, as `CLAIM`'s: the entry's bytes (mode "1" only: fresh or not,
#: the caller decides) | 1 (the lease is taken) | {"wait", holder, pttl}. Taking a lease records the
#: key in its tag sets; waiting flags the lease as waited for (its `STORE` pushes the
#: entry); a foreign lease gets one lease time, as in `CLAIM`. Failure markers and handed
#: entries are not reported: a waiter that is not answered by the push of the lease it waited
#: for goes through `CLAIM` for that key alone.
CLAIM_MANY = Script.of(
    "claim_many",
    _ADD_TAG
    + """
local ms = tonumber(ARGV[1])
local out = {}
local k, a = 1, 5
while a <= #ARGV do
  local ntags = tonumber(ARGV[a])
  local reply = nil
  if ARGV[2] == '1' then
    local value = redis.pcall('GET', KEYS[k])
    if type(value) == 'table' then reply = 'foreign type'
    elseif value then reply = value end
  end
  if not reply then
    if redis.call('SET', KEYS[k + 1], ARGV[a + 1], 'NX', 'PX', ms) then  -- the lease was free
      for i = k + 3, k + 2 + ntags do add_tag(KEYS[i], ARGV[a + 2], ARGV[3], ARGV[4], true) end
      reply = 1
    else
      local holder = redis.pcall('GET', KEYS[k + 1])
      local pttl = redis.call('PTTL', KEYS[k + 1])
      if type(holder) ~= 'string' or #holder ~= 32 or not string.match(holder, '^%x+$') then
        holder = ''
      end
      if pttl < 0 or pttl > ms * 100 or (holder == '' and pttl > ms) then
        redis.call('PEXPIRE', KEYS[k + 1], ms)
        pttl = ms
      end
      redis.call('SET', KEYS[k + 2], '1', 'PX', 2 * ms)  -- outlasts the caller's wait
      reply = {'wait', holder, pttl}
    end
  end
  out[#out + 1] = reply
  k = k + 3 + ntags
  a = a + 3
end
return out
""",
)

#: KEYS: per key: entry, lease, waiters, handed, then its tag sets (none on a cluster).
#: ARGV: per key: its tag count, then `STORE`'s ARGV (token, data, px, handed ms, then only
#: with tag sets: member, tag score, now ms); px "-1": nothing to store, only end the lease
#: (if still ours) and wake its waiters, as `RELEASE` does.
#: Each key as `STORE` does it: written only while the lease is still ours (the fence), the
#: lease ended, the wake-up published only when somebody waits (with the entry when small), a
#: refused store handed to the lease's waiters. Returns one 1 (stored) or 0 per key.
STORE_MANY = Script.of(
    "store_many",
    _ADD_TAG
    + """
local function store_one(k, a, ntags)
  local token = ARGV[a]
  local channel = KEYS[k] .. ':done'
  if ARGV[a + 2] == '-1' then
    if redis.call('GET', KEYS[k + 1]) == token then
      redis.call('DEL', KEYS[k + 1])
      redis.call('PUBLISH', channel, 'r')
    end
    return 0
  end
  local waited = false
  local raise_only = token == '' and redis.call('EXISTS', KEYS[k + 1]) == 1
  if token ~= '' then
    if redis.call('GET', KEYS[k + 1]) ~= token then
      if redis.call('EXISTS', KEYS[k + 2]) == 1 then
        redis.call('SET', KEYS[k + 3], token .. '|' .. ARGV[a + 1], 'PX', ARGV[a + 3])
        redis.call('PUBLISH', channel, 'h')
      end
      return 0
    end
    waited = redis.call('DEL', KEYS[k + 1], KEYS[k + 2]) == 2
  else
    waited = redis.call('EXISTS', KEYS[k + 2]) == 1
  end
  if ARGV[a + 2] == '0' then
    redis.call('SET', KEYS[k], ARGV[a + 1])
  else
    redis.call('SET', KEYS[k], ARGV[a + 1], 'PX', ARGV[a + 2])
  end
  for i = k + 4, k + 3 + ntags do
    add_tag(KEYS[i], ARGV[a + 4], ARGV[a + 5], ARGV[a + 6], raise_only)
  end
  if waited and token ~= '' and #ARGV[a + 1] <= PUSH_MAX then
    redis.call('PUBLISH', channel, 'v' .. token .. '|' .. ARGV[a + 1])
  elseif waited then
    redis.call('PUBLISH', channel, 's')
  end
  return 1
end
local out = {}
local k, a = 1, 1
while a <= #ARGV do
  local ntags = tonumber(ARGV[a])
  out[#out + 1] = store_one(k, a + 1, ntags)
  k = k + 4 + ntags
  a = a + (ntags > 0 and 8 or 5)
end
return out
""".replace("PUSH_MAX", str(PUSH_MAX)),
)


def glob_escape(text: str) -> str:
    """Escape Redis glob metacharacters so `text` matches itself in MATCH / PSUBSCRIBE."""
    return "".join("\\" + ch if ch in "*?[]\\" else ch for ch in text)


class KeyLayout:
    """Where a cache key's entry and siblings live in Redis (see the module docstring)."""

    __slots__ = ("channel_pattern", "invalidate_channel", "namespace", "prefix", "tag_prefix")

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        self.prefix = namespace + ":"
        self.tag_prefix = namespace + ":tag:{"
        self.invalidate_channel = namespace + ":__invalidate__"
        self.channel_pattern = glob_escape(self.prefix) + "{*}:done"

    def rest(self, key: str) -> str:
        """The part of a full key after the namespace (a foreign key is taken whole)."""
        return key[len(self.prefix) :] if key.startswith(self.prefix) else key

    def entry(self, key: str) -> str:
        return f"{self.prefix}{{{self.rest(key)}}}"

    def tag(self, tag: str) -> str:
        return f"{self.tag_prefix}{self.rest(tag)}}}"

    @staticmethod
    def taking(tag_key: str) -> str:
        """The set of a tag's members being deleted (see `TAKE_TAG`), on the tag's slot."""
        return tag_key + ":taking"

    @staticmethod
    def lease(entry_key: str) -> str:
        return entry_key + ":lease"

    @staticmethod
    def failed(entry_key: str) -> str:
        return entry_key + ":failed"

    @staticmethod
    def waiters(entry_key: str) -> str:
        return entry_key + ":waiters"

    @staticmethod
    def handed(entry_key: str) -> str:
        return entry_key + ":handed"

    @staticmethod
    def channel(entry_key: str) -> str:
        return entry_key + ":done"

    def key_of_entry(self, entry_key: str) -> str | None:
        """The cache's full key for a Redis entry key, or None for siblings and strangers."""
        if entry_key.startswith(self.prefix + "{") and entry_key.endswith("}"):
            return self.prefix + entry_key[len(self.prefix) + 1 : -1]
        return None

    def key_of_channel(self, channel: str) -> str | None:
        """The cache's full key whose wake-up channel this is, or None."""
        if channel.startswith(self.prefix + "{") and channel.endswith("}:done"):
            return self.prefix + channel[len(self.prefix) + 1 : -len("}:done")]
        return None

    def match(self, pattern: str) -> str:
        """A SCAN MATCH pattern for entry keys, from a glob over full keys (`ns:user:*`)."""
        return f"{glob_escape(self.prefix)}{{{self.rest(pattern)}}}"


def pushed_entry(message: bytes | None, holder: str) -> bytes | None:
    """The entry bytes a wake-up message carries, if `STORE` of lease `holder` sent it.

    None for markers, for an entry pushed by another lease's leader (an older one, say, whose
    message was still on its way) and for anything else: the waiter then checks Redis.
    """
    if not message or not holder or message[:1] != b"v":
        return None
    prefix = b"v" + holder.encode("utf-8", "surrogateescape") + b"|"
    if not message.startswith(prefix):
        return None
    return message[len(prefix) :]


def encode_failure(token: str, exc: BaseException) -> bytes:
    """The failure marker: the failed lease's token, then the exception's type and message."""
    cls = type(exc)
    name = (
        cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
    )
    message = str(exc)[:1000]
    body: bytes = msgpack.packb([name, message], use_bin_type=True)
    return token.encode() + b"|" + body


def decode_failure(marker: bytes) -> tuple[str, str]:
    """(exception type, message) from a failure marker; a garbled one still reads as a failure."""
    try:
        name, message = msgpack.unpackb(marker.split(b"|", 1)[1], raw=False)
        return str(name), str(message)
    except Exception:
        return "Exception", "unknown error (unreadable failure marker)"
