"""The one Lua script a fleet process runs on Redis: the exchange.

Every round trip a process makes is one call of ``EXCHANGE``, atomic on the server, on
the server's clock (``TIME``: the processes' clocks never meet). It carries everything
the process has to tell the fleet and brings back everything it has to learn:

    in   settlements (id, requests, tokens): a lease's leftovers returned, a request's
         tokens reconciled; each applied once, by its id (a resend is a no-op)
         readings of the upstream's ``remaining`` (the mirror: lowers the shared level)
         a cooldown to publish (the shared "closed until" moves later, never earlier)
         retry-budget counts (requests and retries since the last exchange)
         a lease wanted (requests and tokens: at least ``need``, at most ``want``)
    out  the lease granted (and from when it may be spent), the cooldown, the live
         processes, the buckets' "taken" marks, the fleet's retry-budget counts

One script rather than one per concern because the round trip, not the work in Redis,
is what a request pays: a lease, its predecessor's leftovers, the settlements and the
heartbeat cost one call together.

Keys share one hash tag, ``{aq:<name>}``, so a Redis Cluster keeps a quota on one slot
(a script may only touch keys of one slot):

    {aq:<name>}:requests   hash: level, stamp (ms), taken, held    the requests bucket
    {aq:<name>}:tokens     hash: level, stamp (ms), taken, held    the tokens bucket
    {aq:<name>}:cooldown   string: until (ms, Redis time)
    {aq:<name>}:live       sorted set: process id → last seen (ms)
    {aq:<name>}:settled    sorted set: settlement id → when applied (ms)
    {aq:<name>}:retries    hash: "q:<slice>" / "r:<slice>" → requests / retries counted
    {aq:<name>}:leases     sorted set: "<id>|<requests>|<tokens>" → when the lease ends (ms)

**The buckets.** A bucket holds up to ``burst`` units and refills at ``rate`` units per
millisecond. A lease is granted at once when the level covers ``need`` (up to ``want``,
whole units for requests); otherwise it is granted *ahead*: the whole ``want`` is
debited now (the level goes negative) and the reply says in how many milliseconds the
units become spendable: when the refill has paid the debt back. That is the token
bucket's "reserve" (Go's ``rate.Limiter.Reserve``, GCRA): the fleet queues for units in
Redis in arrival order, each process sleeps exactly as long as it was told, and nobody
polls. Every unit carries the time from which it may be spent, so the units spendable
by any instant never exceed ``burst + rate × elapsed``: the fleet cannot over-admit,
whatever the processes do with their leases (a unit is spent once, or given back). A
lease that would be spendable only more than ``max_ahead`` ms from now is not granted:
the reply says when to ask again.

**Held units.** A unit leased at one instant may be sent a little later (a lease lasts
about 100 ms). Meanwhile the upstream, which has not seen it, may be full and refill
nothing, while a bucket that had merely debited it would refill its room: then the
fleet could send a burst plus what its leases hold. So a bucket counts what its live
leases hold (``held``, until each lease ends or is given back) and never refills past
``burst - held``: what is spendable, in Redis and in every lease together, never exceeds
the burst, and over any span no more than ``burst + rate × span`` goes out, whenever
within its lease each unit is spent.
"""

from __future__ import annotations

import hashlib

__all__ = ["EXCHANGE", "EXCHANGE_SHA", "KEY_SUFFIXES", "keys_for"]

KEY_SUFFIXES = ("requests", "tokens", "cooldown", "live", "settled", "retries", "leases")
"""The keys of one quota, in the order the script takes them."""


def keys_for(name: str) -> list[str]:
    """The Redis keys of the quota ``name``, under its one hash tag."""
    return [f"{{aq:{name}}}:{suffix}" for suffix in KEY_SUFFIXES]


EXCHANGE = r"""
-- ARGV, in order:
--   1 process id            2 leaving (1: deregister)   3 key ttl (ms)
--   4 live window (ms)      5 settled ttl (ms)          6 max ahead (ms)
--   7 requests rate (/ms)   8 requests burst (0: no quota)
--   9 tokens rate (/ms)    10 tokens burst (0: no quota)
--  11 need requests        12 want requests   13 need tokens   14 want tokens
--     (the lease is called ARGV[25] and lasts ARGV[26] ms from when it may be spent)
--  15 cooldown to publish, ms from now (0: none)
--  16 requests remaining read (-1: none)      17 the requests mark of that reading
--  18 tokens remaining read (-1: none)        19 the tokens mark of that reading
--  20 retry window slice (ms)                 21 slices in the window
--  22 requests counted     23 retries counted
--  24 settlements n, then n quadruples: id, requests, tokens (> 0 charges, < 0
--     refunds), and the lease the units come back from ("": none)
--  25 the lease's id        26 its length (ms)
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local ttl = tonumber(ARGV[3])

local function load(key, rate, burst)
  if burst <= 0 then return nil end
  local v = redis.call('HMGET', key, 'level', 'stamp', 'taken', 'held')
  local b = {key = key, rate = rate, burst = burst, level = tonumber(v[1]),
             stamp = tonumber(v[2]), taken = tonumber(v[3]) or 0, held = tonumber(v[4]) or 0}
  if b.level == nil or b.stamp == nil then
    b.level = burst
    b.stamp = now
  end
  return b
end

-- Refill up to now, never past what the live leases leave of the burst.
local function refill(b)
  if b == nil then return end
  local cap = b.burst - b.held
  if now > b.stamp then  -- time that runs backwards stands still
    if b.level < cap then b.level = math.min(cap, b.level + (now - b.stamp) * b.rate) end
    b.stamp = now
  end
end

local function save(b)
  if b == nil then return end
  redis.call('HSET', b.key, 'level', tostring(b.level), 'stamp', tostring(b.stamp),
             'taken', tostring(b.taken), 'held', tostring(math.max(0, b.held)))
  redis.call('PEXPIRE', b.key, ttl)
end

local function charge(b, amount)
  if b == nil or amount == 0 then return end
  if amount > 0 then
    b.level = b.level - amount
    b.taken = b.taken + amount
  else
    b.level = math.max(b.level, math.min(b.burst - b.held, b.level - amount))
  end
end

local req, tok  -- the two buckets, loaded below

-- A lease that ended (or came back) no longer holds its units.
local function release(member)
  local _, r, t = string.match(member, '^(.*)|([^|]*)|([^|]*)$')
  if req then req.held = req.held - (tonumber(r) or 0) end
  if tok then tok.held = tok.held - (tonumber(t) or 0) end
end

-- A lease from one bucket: (granted, ms until spendable).
local function plan(b, need, want, whole)
  if want <= 0 then return 0, 0 end
  if b == nil then return want, 0 end
  if b.level >= need then
    local g = math.min(want, b.level)
    if whole then g = math.floor(g) end
    return math.max(g, need), 0
  end
  local short = math.min(want, b.burst) - b.level
  if short <= 0 then return want, 0 end
  return want, short / b.rate
end

req = load(KEYS[1], tonumber(ARGV[7]), tonumber(ARGV[8]))
tok = load(KEYS[2], tonumber(ARGV[9]), tonumber(ARGV[10]))

-- Leases that ended let their units go (their leftovers come back as settlements).
local ended = redis.call('ZRANGEBYSCORE', KEYS[7], '-inf', now)
for _, member in ipairs(ended) do release(member) end
if #ended > 0 then redis.call('ZREMRANGEBYSCORE', KEYS[7], '-inf', now) end
refill(req)
refill(tok)

-- Settlements: returned units are there for the lease asked for below.
local n = tonumber(ARGV[24])
for i = 0, n - 1 do
  local at = 27 + 4 * i
  local lease = ARGV[at + 3]
  if lease ~= '' and redis.call('ZREM', KEYS[7], lease) == 1 then release(lease) end
  if redis.call('ZADD', KEYS[5], 'NX', now, ARGV[at]) == 1 then
    charge(req, tonumber(ARGV[at + 1]))
    charge(tok, tonumber(ARGV[at + 2]))
  end
end
redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', now - tonumber(ARGV[5]))
redis.call('PEXPIRE', KEYS[5], math.max(ttl, tonumber(ARGV[5])))

-- The upstream's word lowers the shared level, never raises it: what it says is left,
-- less what the fleet took since the reading's request was granted.
local function mirror(b, remaining, mark)
  if b == nil or remaining < 0 then return end
  b.level = math.min(b.level, remaining - math.max(0, b.taken - mark))
end
mirror(req, tonumber(ARGV[16]), tonumber(ARGV[17]))
mirror(tok, tonumber(ARGV[18]), tonumber(ARGV[19]))

-- The lease: both buckets or neither.
local max_ahead = tonumber(ARGV[6])
local gr, wr = plan(req, tonumber(ARGV[11]), tonumber(ARGV[12]), true)
local gt, wt = plan(tok, tonumber(ARGV[13]), tonumber(ARGV[14]), false)
local wait = math.max(wr, wt)
local retry = 0
local lease = ''
if wait > max_ahead then
  retry = wait - max_ahead
  gr, gt, wait = 0, 0, 0
elseif gr > 0 or gt > 0 then
  charge(req, gr)
  charge(tok, gt)
  lease = ARGV[25] .. '|' .. tostring(req and gr or 0) .. '|' .. tostring(tok and gt or 0)
  redis.call('ZADD', KEYS[7], now + wait + tonumber(ARGV[26]), lease)
  redis.call('PEXPIRE', KEYS[7], ttl)
  if req then req.held = req.held + gr end
  if tok then tok.held = tok.held + gt end
end
save(req)
save(tok)

-- The cooldown only moves later.
local publish = tonumber(ARGV[15])
local until_ = tonumber(redis.call('GET', KEYS[3]) or '0') or 0
if publish > 0 and now + publish > until_ then
  until_ = now + publish
  redis.call('SET', KEYS[3], tostring(until_), 'PX', math.ceil(publish + ttl))
end

-- The heartbeat: live = seen within the live window.
if ARGV[2] == '1' then
  redis.call('ZREM', KEYS[4], ARGV[1])
else
  redis.call('ZADD', KEYS[4], now, ARGV[1])
end
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now - tonumber(ARGV[4]))
redis.call('PEXPIRE', KEYS[4], ttl)
local live = redis.call('ZCARD', KEYS[4])

-- The retry budget's window, in slices of Redis time.
local width = tonumber(ARGV[20])
local slices = tonumber(ARGV[21])
local slice = math.floor(now / width)
local q, r = tonumber(ARGV[22]), tonumber(ARGV[23])
if q > 0 then redis.call('HINCRBY', KEYS[6], 'q:' .. slice, q) end
if r > 0 then redis.call('HINCRBY', KEYS[6], 'r:' .. slice, r) end
local requests, retries = 0, 0
local fields = redis.call('HGETALL', KEYS[6])
for i = 1, #fields, 2 do
  local kind, at = string.match(fields[i], '^(%a):(-?%d+)$')
  at = tonumber(at)
  if at == nil or at <= slice - slices then
    redis.call('HDEL', KEYS[6], fields[i])
  elseif kind == 'q' then
    requests = requests + tonumber(fields[i + 1])
  else
    retries = retries + tonumber(fields[i + 1])
  end
end
if #fields > 0 then redis.call('PEXPIRE', KEYS[6], ttl) end

return {tostring(gr), tostring(gt), tostring(wait), tostring(retry), tostring(until_),
        tostring(math.max(0, until_ - now)), live,
        tostring(req and req.taken or 0), tostring(tok and tok.taken or 0),
        requests, retries, lease}
"""

EXCHANGE_SHA = hashlib.sha1(EXCHANGE.encode()).hexdigest()
"""What ``EVALSHA`` calls ``EXCHANGE`` by (``EVAL`` loads it where Redis lost it)."""
