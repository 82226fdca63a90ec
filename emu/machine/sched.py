"""Controlled scheduling: one emulated CPU runs between two yield points.

Modelled (DESIGN.md §5, issue 12): under ``sched="controlled"`` the CPU processes of
a trial take turns. Every yield point (``YieldPoints.yp``) and every wait of the
emulated code (``Events.wait``: lock spins, barrier waits, their ``mce_panic_check``)
is a scheduling point: the running process records where it is, picks the next one
with a deterministic *strategy* and hands it the turn (a store and a futex wake);
everybody else sleeps on its own turn word. No coordinator hop per step.

A waiting process is *blocked* on an event channel: it is enabled again only once the
channel's counter moved (exactly the condition the futex sleep relies on: every change
a waiter waits for bumps its channel). When no process is enabled and not all have
left, the trial is a ``deadlock``, known at once; the coordinator reports each CPU's
phase and what it waits on, then resets the machine as for a hang.

The decisions (who ran at each step, at which site, the enabled set and who ran
before) are logged in shared memory; a *token* (:func:`encode_token`) carries them,
run-length encoded, with a header naming the machine, the handler, the strategy and
the scenario, so a replay gives the same yield-point trace bit for bit.

Strategies (pure functions of the shared state and the step index):

- ``random``: E (enabled, ascending) ``[splitmix64(seed, step) % |E|]``.
- ``pct:D`` (Burckhardt et al., ASPLOS 2010): distinct random priorities > D, D-1
  change points in [1, k]; at the i-th the running process's priority becomes i; a
  process picked from a wait that finds its condition still false drops below all
  (as Shuttle does). The highest-priority enabled process runs.
- ``replay``: the token's decisions; a recorded choice that is not enabled, or a run
  longer than the record, marks the trial ``diverged`` (step and reason) and goes on
  with the default choice.
- ``prefix`` (the DFS explorer's): the given decisions, then the default.
- ``follow`` (from a chaos trace): the observed order of yield-point passages, one
  CPU per entry; an entry is consumed when its CPU passes a yield point; a CPU that
  cannot run (it waits) when its entry comes gets the default instead (a *miss*).
- default (non-preemptive): the running process if enabled, else the lowest enabled.

Participants are the trial's target CPUs, from their first scheduling point after
the #MC (or CMCI) to their return to the idle loop, or their halt. Each is marked with
a *join id*; a process consumes it at its first yield point (an *arrival*) and waits for
its turn. The last to arrive makes the first choice (before it, every target sits at its
first yield point whatever the arrival order, so the choice is the same).

Processes that join later are arrivals too, and the next choice waits until each has
arrived (so it does not depend on when their signals landed):

- a **second #MC wave** (``then=``) is a pseudo-participant, number ``n`` (the CPU
  count): enabled once a first-wave target has reached ``after_phase`` (or when no CPU
  can run), and when the strategy picks it the turn goes to the coordinator, which
  writes the wave's banks and raises its #MC; its targets arrive (a CPU waiting for its
  turn takes the nested #MC there), then the coordinator makes the next choice. The
  decision log holds it (``raise`` in the trace), so a token replays it, and a token
  that raises where the raise is not enabled is ``diverged``;
- **CMCI and poll trials**: the CMCIs' handlers arrive first; then the coordinator asks
  for the poll round and arrives itself, CPU 0 arrives at its ``on_each_cpu`` IPIs, and
  the IPIs' recipients arrive at their handler's first yield point (one that finds
  interrupts off counts as arrived; its handler runs later in its turn).

- **Dom0** (number ``n + 1``, ``dom0`` in the trace), in #MC and CMCI/poll trials that
  start with Dom0 idle (told of every VIRQ, asleep; the coordinator waits for that):
  enabled while a drain is under way (it has a request to come) or once a VIRQ was
  raised that it was not told of. When the strategy picks it, the turn goes to the
  coordinator, which tells it of that VIRQ, then serves exactly one of its telemetry
  hypercalls (a fetch or an ack, on the shared pool) or learns that it went idle (Dom0
  says ``idle`` with the count of notifications it handled), then makes the next
  choice. Dom0's requests are a function of the replies, so the steps replay. Once
  every CPU has left, the trial is over and Dom0 finishes its drain outside the
  schedule.

Not controlled (documented limits): guest processes and Dom0's vMCE handler (their MSR
accesses are served as they come, or within Dom0's steps), Dom0 in trials with a fault
and when paused or failing, the coordinator's signals and late doorbell rings, timers
(the polling timer is refused) and Dom0's log writes and fsync (between two of its
steps: nothing a CPU sees); ``Machine.poll`` and CPU offline/online run unscheduled.
"""
from __future__ import annotations

import base64
import hashlib
import json
import struct
import zlib

from emu.errors import UsageError
from emu.hw.futex import Events, futex_wait, futex_wake
from emu.hw.msr import NREGS, REG_ADDR, REG_MISC, REG_STATUS
from emu.hw.yieldpoint import SITE, SITES

STRATEGIES = ("random", "pct:D", "replay:TOKEN", "dfs:P")
K_DEFAULT, K_RANDOM, K_PCT, K_REPLAY, K_PREFIX, K_FOLLOW = 0, 1, 2, 3, 4, 5
KIND_NAME = {K_DEFAULT: "default", K_RANDOM: "random", K_PCT: "pct", K_REPLAY: "replay",
             K_PREFIX: "prefix", K_FOLLOW: "follow"}
IDLE, READY, BLOCKED, RUNNING, LEFT = 0, 1, 2, 3, 4
STATE_NAME = ("idle", "ready", "blocked", "running", "left")
OVER_NONE, OVER_DONE, OVER_RESET, OVER_DEADLOCK = 0, 1, 2, 3
SITE_WAIT = 254                 # the site logged for a process picked from a wait
NONE = 0xFFFF                   # no process (turn before the first choice; no current)
MAX_DEPTH = 16                  # PCT's D
PRIO_BIAS = 1 << 40             # priorities are stored biased (drops go below zero)
M64 = (1 << 64) - 1
_DATA_REGS = (REG_STATUS, REG_ADDR, REG_MISC)

# global words
(G_TURN, G_STEP, G_ARRIVED, G_EXPECT, G_EPOCH, G_KIND, G_SEED, G_NPLAN, G_OVER,
 G_DIVERGED, G_DEPTH, G_MINPRIO, G_SPINS, G_DIV_WHY, G_FPTR, G_FMISS) = range(16)
G_CP = 16                       # MAX_DEPTH change points
# G_JOIN: the last join id handed out (never reset: ids stay unique for the boot);
# G_PARTS: bumped when participants are added mid-trial; G_RAISE: the second wave
# (RAISE_NONE, RAISE_PENDING, RAISE_DONE), enabled once a first-wave target reached
# the phase bits G_RAISE_BIT; G_RAISE_PRIO its PCT priority; G_ASLEEP: a chooser
# sleeps on G_ARRIVED (arrivals wake it).
(G_JOIN, G_PARTS, G_RAISE, G_RAISE_BIT, G_RAISE_PRIO, G_ASLEEP) = range(
    G_CP + MAX_DEPTH, G_CP + MAX_DEPTH + 6)
# Dom0 as a participant (number n + 1): G_DOM0_ON, it takes part in this trial;
# G_DOM0_BUSY, it has a request to come (a drain under way); G_DOM0_VSEEN, the VIRQ
# count it was last told of (a VIRQ raised since enables it); G_DOM0_PRIO, its PCT
# priority.
(G_DOM0_ON, G_DOM0_BUSY, G_DOM0_VSEEN, G_DOM0_PRIO) = range(
    G_CP + MAX_DEPTH + 6, G_CP + MAX_DEPTH + 10)
G_WORDS = G_CP + MAX_DEPTH + 12
# per-CPU words (C_JOIN: a join id this CPU has to consume at its next scheduling
# point; C_FIRST: a first-wave target, whose phases enable the raise)
(C_STATE, C_SITE, C_BOFF, C_BSEEN, C_TW, C_TSLEEP, C_PRIO, C_PART, C_JOIN, C_FIRST) = range(10)
C_WORDS = 10
DIV_NOT_ENABLED, DIV_PAST_END = 1, 2
RAISE_NONE, RAISE_PENDING, RAISE_DONE = 0, 1, 2
SITE_DOM0 = 251                 # the site logged when Dom0's next request is served
SITE_IPI = 252                  # the site logged for a poll round joining at its IPIs
SITE_RAISE = 253                # the site logged when the second #MC wave is chosen


def site_name(code: int) -> str:
    if code == SITE_WAIT:
        return "wait"
    if code == SITE_RAISE:
        return "raise"
    if code == SITE_IPI:
        return "ipi"
    if code == SITE_DOM0:
        return "dom0"
    return SITES[code] if code < len(SITES) else "?"


class SchedLayout:
    """Word offsets of the scheduler's section (in the Xen region, from ``base``):
    global words, per-CPU words, the decision log (2 words a step: ``q | site << 16 |
    cur << 32``, and the enabled set as a bit mask of the first 64 CPUs) and the plan
    (replay or prefix decisions, u16 each)."""

    def __init__(self, base: int, ncpus: int, nsteps: int):
        self.base, self.n, self.nsteps = base, ncpus, nsteps
        self.g = base
        self.c = base + 8 * G_WORDS
        self.log = self.c + 8 * C_WORDS * ncpus
        self.plan = self.log + 16 * nsteps
        self.words = G_WORDS + C_WORDS * ncpus + 2 * nsteps + (nsteps * 2 + 7) // 8

    @staticmethod
    def nwords(ncpus: int, nsteps: int) -> int:
        return G_WORDS + C_WORDS * ncpus + 2 * nsteps + (nsteps * 2 + 7) // 8

    def gw(self, k: int) -> int:
        return self.g + 8 * k

    def cw(self, cpu: int, k: int) -> int:
        return self.c + 8 * (cpu * C_WORDS + k)


def splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & M64
    return x ^ (x >> 31)


# -- strategy specs ---------------------------------------------------------------------
def parse_strategy(text: str) -> dict:
    """``random`` | ``pct:D`` | ``replay:TOKEN`` | ``dfs:P`` → a dict (UsageError
    naming ``strategy`` otherwise)."""
    if not isinstance(text, str) or not text:
        raise UsageError("strategy", f"{text!r}: choose one of {', '.join(STRATEGIES)}")
    name, _, arg = text.partition(":")
    if name == "random" and not arg:
        return {"kind": "random"}
    if name in ("pct", "dfs"):
        lo, hi = (1, MAX_DEPTH) if name == "pct" else (0, 8)
        try:
            v = int(arg)
        except ValueError:
            v = None
        if v is None or not lo <= v <= hi:
            what = "depth D" if name == "pct" else "preemption bound P"
            raise UsageError("strategy", f"{text!r}: give {name}:N with the {what} in "
                             f"{lo}..{hi}, e.g. {name}:{2 if name == 'dfs' else 3}")
        return {"kind": name, "depth" if name == "pct" else "bound": v}
    if name == "replay" and arg:
        return {"kind": "replay", "token": arg}
    raise UsageError("strategy", f"{text!r}: choose one of {', '.join(STRATEGIES)}")


# -- tokens -------------------------------------------------------------------------------
TOKEN_PREFIX = "emu1."
MACHINE_KEYS = ("topology", "nbanks", "bank_scopes", "ser", "lmce", "mcg_ctl_p",
                "mce_broadcast", "memory_pages", "guests", "guest_vcpus", "vmce_policy")


def machine_header(cfg) -> dict:
    return {k: getattr(cfg, k) for k in MACHINE_KEYS}


def rle(seq: list[int]) -> list[list[int]]:
    out: list[list[int]] = []
    for q in seq:
        if out and out[-1][0] == q:
            out[-1][1] += 1
        else:
            out.append([q, 1])
    return out


def unrle(pairs) -> list[int]:
    out: list[int] = []
    for q, k in pairs:
        out.extend([int(q)] * int(k))
    return out


def encode_token(header: dict, decisions: list[int]) -> str:
    """Header + decisions (run-length encoded) → zlib → urlsafe base64, prefixed."""
    raw = json.dumps({"h": header, "d": rle(decisions)}, sort_keys=True,
                     separators=(",", ":")).encode()
    return TOKEN_PREFIX + base64.urlsafe_b64encode(zlib.compress(raw, 9)).decode().rstrip("=")


def decode_token(token: str) -> tuple[dict, list[int]]:
    if not isinstance(token, str) or not token.startswith(TOKEN_PREFIX):
        raise UsageError("schedule", "not a schedule token (they start with "
                         f"{TOKEN_PREFIX!r}; copy it from an `emu replay --schedule` line)")
    body = token[len(TOKEN_PREFIX):].strip()
    try:
        raw = zlib.decompress(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
        obj = json.loads(raw)
        return obj["h"], unrle(obj["d"])
    except Exception:  # noqa: BLE001 - any corruption is the same usage error
        raise UsageError("schedule", "the token is damaged (truncated or edited?): "
                         "copy the whole token") from None


def check_token_machine(header: dict, cfg) -> None:
    """UsageError (exit 2) naming every difference between the machine the token was
    recorded on and ``cfg``."""
    diffs = []
    if header.get("handler") != cfg.handler:
        diffs.append(f"handler {header.get('handler')!r} (this machine runs {cfg.handler!r})")
    want = header.get("machine") or {}
    for k in MACHINE_KEYS:
        if k in want and want[k] != getattr(cfg, k):
            diffs.append(f"{k}={want[k]!r} (this machine has {getattr(cfg, k)!r})")
    if diffs:
        raise UsageError("schedule", "the token was recorded on a different machine: "
                         + "; ".join(diffs) + ". Replay it on the machine it names "
                         "(emu replay --schedule TOKEN builds that machine)")


def trace_digest(trace: list) -> str:
    h = hashlib.blake2b(digest_size=8)
    for q, s in trace:
        h.update(struct.pack("<HB", q, s))
    return h.hexdigest()


# -- inside a CPU process -----------------------------------------------------------------
class Sched:
    """The scheduler as one CPU process runs it (installed by ``cpu_process``); the
    coordinator builds one too (``cpu=None``) to make the first choice after a raise
    or a poll round's start."""

    def __init__(self, R, cpu: int | None, S: SchedLayout):
        self.R, self.X, self.S = R, R.X, S
        self.cpu = NONE if cpu is None else cpu
        self.n = S.n
        self.ev = R.ev
        self.base = R.X.address
        self.halt_ev = R.L.halt_ev
        self.reset_req = R.L.reset_req
        self.on = False
        self._rec = None
        self.epoch = 0
        self.joined = 0            # the last join id this process consumed
        self.parts: list[int] = []
        self._parts_gen = -1
        self.hdepth = 0            # signal handlers (#MC, interrupt) running, nested
        self.in_idle = False       # the interrupted base context is an idle wait
        self.pending = _nothing_pending   # work queued for this CPU (cpu_process sets it)
        self.g = [S.gw(k) for k in range(G_WORDS)]
        self.my = [S.cw(self.cpu, k) for k in range(C_WORDS)] if cpu is not None else None
        self.cw = [[S.cw(c, k) for k in range(C_WORDS)] for c in range(self.n)]
        L = R.L
        self._reached = [L.pc(c, L.P_REACHED) for c in range(self.n)]
        self._virq = L.vm.virq_count
        self._plan = memoryview(R.xen_map)[S.plan:S.plan + 2 * S.nsteps].cast("H")

    def install(self, yps) -> None:
        """Take over the yield points and the waits of this process (before the handler
        object is built: it captures ``yps.yp``). Instance attributes: the uncontrolled
        classes keep their code and cost."""
        # A traced machine records each yield point once the process passes it (after
        # the scheduler let it run), so the ring shows the schedule's order.
        self._rec = yps.yp if yps.trace is not None else None
        yps.yp = self.yp
        # Yield points that reconfigure per trial (chaos, issue 11) re-pick their ``yp``
        # in ``_set_mode``: under controlled it stays the scheduler's.
        yps._set_mode = lambda: setattr(yps, "yp", self.yp)
        self.ev.wait = self.wait
        self.ev.spin_ns = 0        # McaBarrier skips its spin phase

    # -- scheduling points ------------------------------------------------------------
    def yp(self, site: str, d0: int = 0, d1: int = 0) -> None:
        X, my = self.X, self.my
        j = X.load(my[C_JOIN])
        if j and j != self.joined:
            # The first yield point of a handler this CPU was marked for (the trial's
            # #MC, a second wave, an IPI or CMCI): an arrival.
            self._arrive(j, SITE.get(site, 255))
        elif self.on:
            X.store(my[C_STATE], READY)
            X.store(my[C_SITE], SITE.get(site, 255))
            if X.load(self.g[G_TURN]) != self.cpu:
                # A handler nested into a process that was waiting for its turn (not
                # marked: a signal the schedule did not ask for). It waits its turn too.
                self._await_turn()
            else:
                q = self.choose(self.cpu)
                if q != self.cpu:
                    self._switch(q)
            X.store(my[C_STATE], RUNNING)
        if self._rec is not None:
            self._rec(site, d0, d1)

    def wait(self, off: int, cond, timeout_s=None, slice_s: float = 0.05, check=None,
             spin_ns=None) -> bool:
        if not self.on:
            # Only a yield point joins (the #MC path's first): a wait may be the idle
            # loop's, entered after the coordinator marked the next trial's targets.
            prev, self.in_idle = self.in_idle, True
            try:
                return Events.wait(self.ev, off, cond, timeout_s, slice_s, check, spin_ns)
            finally:
                self.in_idle = prev
        if off == self.halt_ev:
            # halt() and mc_panic() wait here forever: this process leaves the schedule.
            self.leave()
            return Events.wait(self.ev, off, cond, timeout_s, slice_s, check, spin_ns)
        X, my, me = self.X, self.my, self.cpu
        j = X.load(my[C_JOIN])
        if j and j != self.joined:
            self._arrive(j, SITE_WAIT)
        picked = False
        while not cond():
            if picked and X.load(self.g[G_KIND]) == K_PCT:
                # Picked, and the condition still false: a spin. PCT drops it below all.
                m = X.load(self.g[G_MINPRIO]) - 1
                X.store(self.g[G_MINPRIO], m)
                X.store(my[C_PRIO], m)
            if picked:
                X.fetch_add(self.g[G_SPINS], 1)
            X.store(my[C_BOFF], off)
            X.store(my[C_BSEEN], X.load(off))
            X.store(my[C_STATE], BLOCKED)
            if X.load(self.g[G_TURN]) != me:
                self._await_turn()     # (as in yp: a nested handler's wait)
            else:
                q = self.choose(me)
                if q != me:
                    self._switch(q)
            X.store(my[C_STATE], RUNNING)
            picked = True
            if check is not None:
                check()
        return True

    def leave(self) -> None:
        """The end of this CPU's part of the trial (back at its idle loop, or at a
        halt)."""
        if not self.on:
            return
        self.on = False
        self.X.store(self.my[C_STATE], LEFT)
        q = self.choose(self.cpu)
        if q >= 0:
            self._hand(q)

    def handler_exit(self) -> None:
        """A signal handler (#MC, interrupt) returned to the base context. If that is
        the idle loop's wait and nothing is queued for this CPU (a softirq, a poll
        round), its part of the trial is over."""
        if self.on and self.in_idle and not self.pending():
            self.leave()

    def ack(self) -> None:
        """An interrupt this CPU was marked for found interrupts off (in a handler):
        it waits in the IRR, and runs later in this CPU's turn. Its arrival counts
        now (the chooser waits for it)."""
        X, my = self.X, self.my
        j = X.load(my[C_JOIN])
        if not j or j == self.joined:
            return
        if not self.on:
            self._arrive(j, SITE_IPI)
            return
        self.joined = j
        self._arrived()

    def before_ipi(self, cpus) -> None:
        """A call-function IPI is about to be sent to ``cpus`` (the poll round's
        ``on_each_cpu``). A poll round joins the schedule here (its CPU was marked);
        under the schedule, the recipients are marked, and the next choice waits
        until each has arrived (at its handler's first yield point, or deferred)."""
        X = self.X
        j = X.load(self.my[C_JOIN])
        if j and j != self.joined:
            self._arrive(j, SITE_IPI)
        if not self.on or not cpus:
            return
        jid = X.fetch_add(self.g[G_JOIN], 1) + 1
        ep = X.load(self.g[G_EPOCH])
        for c in cpus:
            X.store(self.cw[c][C_PART], ep)
            X.store(self.cw[c][C_JOIN], jid)
        X.fetch_add(self.g[G_PARTS], 1)
        X.fetch_add(self.g[G_EXPECT], len(cpus))

    def after_signal(self, cpus) -> None:
        """Signals were sent to ``cpus``: wake those sleeping on their turn word, so a
        signal that landed just before the sleep is handled now (not at its timeout)."""
        for c in cpus:
            self.ring(c)

    def ring(self, c: int) -> None:
        w = self.cw[c]
        self.X.fetch_add(w[C_TW], 1)
        futex_wake(self.base + w[C_TW], 1)

    # -- mechanism --------------------------------------------------------------------
    def _arrive(self, j: int, site: int) -> None:
        """Consume join ``j``: this process is in the schedule from now, and waits for
        its turn. The last arrival of a start (nobody holds the turn) makes the first
        choice: before it, every participant sits at its first scheduling point, so
        the choice does not depend on the order in which the signals landed."""
        X, my = self.X, self.my
        self.joined = j
        self.on = True
        self.epoch = X.load(self.g[G_EPOCH])
        self._refresh()
        X.store(my[C_SITE], site)
        X.store(my[C_STATE], READY)
        if self._arrived() and X.load(self.g[G_TURN]) == NONE:
            q = self.choose(NONE)
            if q != self.cpu:
                self._switch(q)
            else:
                X.store(self.g[G_TURN], q)
        else:
            self._await_turn()
        X.store(my[C_STATE], RUNNING)

    def _arrived(self) -> bool:
        X, g = self.X, self.g
        last = X.fetch_add(g[G_ARRIVED], 1) + 1 >= X.load(g[G_EXPECT])
        if X.load(g[G_ASLEEP]):
            futex_wake(self.base + g[G_ARRIVED])
        return last

    def _await_arrivals(self) -> None:
        """The chooser waits until every marked participant has arrived."""
        X, g = self.X, self.g
        load = X.load
        while load(g[G_ARRIVED]) < load(g[G_EXPECT]):
            X.store(g[G_ASLEEP], 1)
            seen = load(g[G_ARRIVED])
            if seen >= load(g[G_EXPECT]) or load(self.reset_req):
                break
            futex_wait(self.base + g[G_ARRIVED], seen, 0.05)
        X.store(g[G_ASLEEP], 0)

    def _refresh(self) -> None:
        X, e = self.X, self.X.load(self.g[G_EPOCH])
        self._parts_gen = X.load(self.g[G_PARTS])
        self.parts = [c for c in range(self.n) if X.load(self.cw[c][C_PART]) == e]

    def _hand(self, q: int) -> None:
        X = self.X
        if q >= self.n:
            # The second #MC wave (n): the coordinator raises it; Dom0 (n + 1): the
            # coordinator serves its next request. Either way, the coordinator's turn.
            X.store(self.g[G_TURN], q)
            self.R.notify()
            return
        w = self.cw[q]
        X.store(self.g[G_TURN], q)
        X.fetch_add(w[C_TW], 1)
        if X.load(w[C_TSLEEP]):
            futex_wake(self.base + w[C_TW], 1)

    def _switch(self, q: int) -> None:
        if q >= 0:
            self._hand(q)
        else:
            # Nobody can run (deadlock) or a reset stops the schedule: give the turn to
            # no one and sleep until the reset controller kills this process.
            self.X.store(self.g[G_TURN], NONE)
        self._await_turn()

    def _await_turn(self) -> None:
        X, me, turn = self.X, self.cpu, self.g[G_TURN]
        tw, sl = self.my[C_TW], self.my[C_TSLEEP]
        addr = self.base + tw
        while X.load(turn) != me:
            X.store(sl, 1)
            seen = X.load(tw)
            if X.load(turn) == me:
                X.store(sl, 0)
                return
            futex_wait(addr, seen, 1.0)
            X.store(sl, 0)

    def choose(self, cur: int) -> int:
        """The next process to run (-1: none; then the trial is over, stopped for a
        reset, or deadlocked, and OVER says which; ``n``: the second #MC wave). Runs
        only in the process that holds the turn (or the coordinator, holding it)."""
        X, g = self.X, self.g
        load = X.load
        if load(g[G_ARRIVED]) < load(g[G_EXPECT]):
            self._await_arrivals()
        if load(self.reset_req):
            X.store(g[G_OVER], OVER_RESET)
            self.R.notify()
            return -1
        if load(g[G_PARTS]) != self._parts_gen or load(g[G_EPOCH]) != self.epoch:
            self.epoch = load(g[G_EPOCH])
            self._refresh()
        E = []
        mask = 0
        left = 0
        for p in self.parts:
            w = self.cw[p]
            st = load(w[C_STATE])
            if st == READY or (st == BLOCKED and load(load(w[C_BOFF])) != load(w[C_BSEEN])):
                E.append(p)
                if p < 64:
                    mask |= 1 << p
            elif st == LEFT:
                left += 1
        n = self.n
        pending = load(g[G_RAISE]) == RAISE_PENDING
        if pending:
            # The second wave can be raised once a first-wave target reached its phase
            # (and when nothing else can run: the OS path raises it at its deadline).
            bit = load(g[G_RAISE_BIT])
            if not E or any(load(self.cw[p][C_FIRST]) and load(self._reached[p]) & bit
                            for p in self.parts):
                E.append(n)
                if n < 64:
                    mask |= 1 << n
        if load(g[G_DOM0_ON]) and (E or left != len(self.parts)) and (
                load(g[G_DOM0_BUSY]) or load(self._virq) != load(g[G_DOM0_VSEEN])):
            # Dom0 has a request to come (a drain under way, or a VIRQ it was not told
            # of yet). Once every CPU has left, the trial is over and Dom0 goes on
            # outside the schedule, as on the host.
            E.append(n + 1)
            if n + 1 < 64:
                mask |= 1 << (n + 1)
        if not E:
            X.store(g[G_OVER], OVER_DONE if left == len(self.parts) and not pending
                    else OVER_DEADLOCK)
            self.R.notify()
            return -1
        s = load(g[G_STEP])
        kind = load(g[G_KIND])
        q = -1
        if kind == K_RANDOM:
            q = E[splitmix64(load(g[G_SEED]) ^ (s * 0xD1B54A32D192ED03 & M64)) % len(E)]
        elif kind == K_PCT:
            d = load(g[G_DEPTH])
            if cur != NONE and d > 1:
                for i in range(d - 1):
                    if load(g[G_CP + i]) == s:
                        X.store(self.cw[cur][C_PRIO] if cur < n else g[G_DOM0_PRIO],
                                PRIO_BIAS + i + 1)
                        break
            best = -1
            for p in E:
                pr = load(self.cw[p][C_PRIO]) if p < n else load(
                    g[G_RAISE_PRIO] if p == n else g[G_DOM0_PRIO])
                if pr > best:
                    best, q = pr, p
        elif kind in (K_REPLAY, K_PREFIX):
            if s < load(g[G_NPLAN]):
                want = self._plan[s]
                if want in E:
                    q = want
                elif not load(g[G_DIVERGED]):
                    X.store(g[G_DIVERGED], s + 1)
                    X.store(g[G_DIV_WHY], DIV_NOT_ENABLED << 16 | want)
            elif kind == K_REPLAY and not load(g[G_DIVERGED]):
                X.store(g[G_DIVERGED], s + 1)
                X.store(g[G_DIV_WHY], DIV_PAST_END << 16)
        elif kind == K_FOLLOW:
            j = load(g[G_FPTR])
            if j < load(g[G_NPLAN]):
                want = self._plan[j]
                if want in E and want < n:
                    q = want
                    if load(self.cw[q][C_STATE]) == READY:
                        X.store(g[G_FPTR], j + 1)   # it passes its yield point now
                else:
                    X.fetch_add(g[G_FMISS], 1)   # it waits here: the default runs
        if q < 0:
            q = cur if cur in E else E[0]     # the default: non-preemptive
        if q == n:
            X.store(g[G_RAISE], RAISE_DONE)
        if s < self.S.nsteps:
            if q == n:
                site = SITE_RAISE
            elif q == n + 1:
                site = SITE_DOM0
            else:
                st = load(self.cw[q][C_STATE])
                site = SITE_WAIT if st == BLOCKED else load(self.cw[q][C_SITE])
            X.store(self.S.log + 16 * s, q | site << 16 | cur << 32)
            X.store(self.S.log + 16 * s + 8, mask)
        X.store(g[G_STEP], s + 1)
        return q


def _nothing_pending() -> bool:
    return False


# -- the coordinator's side -----------------------------------------------------------------
class SchedControl:
    """Loads a trial's strategy, watches for a deadlock, reads the decision log."""

    def __init__(self, R, S: SchedLayout):
        self.R, self.X, self.S = R, R.X, S
        self.epoch = 0
        self.spec: dict = {}
        self._plan = memoryview(R.xen_map)[S.plan:S.plan + 2 * S.nsteps].cast("H")
        self._names = _channel_names(R.L)

    def start(self, targets: list[int], spec: dict, raise_phase_bit: int = 0,
              others: list[int] | None = None, extra_arrivals: int = 0,
              dom0_vseen: int | None = None) -> None:
        """Before the delivery: reset the words, mark the participants, load the
        strategy. ``spec``: {"kind", "seed", "depth", "k", "plan"} (see load_spec).
        ``raise_phase_bit``: a second #MC wave is a step, enabled once a first-wave
        target has reached a phase in these ``P_REACHED`` bits. ``others``: CPUs that
        may join later (a second wave, IPIs), given PCT priorities now.
        ``extra_arrivals``: arrivals the coordinator itself makes (see
        :meth:`arrive`) before the first choice. ``dom0_vseen``: Dom0 takes part (it is
        idle, and was told of this many VIRQs); None: it stays outside the schedule."""
        X, S = self.X, self.S
        self.epoch += 1
        self.spec = spec
        for k in range(G_WORDS):
            if k != G_JOIN:
                X.store(S.gw(k), 0)
        X.store(S.gw(G_TURN), NONE)
        X.store(S.gw(G_EXPECT), len(targets) + extra_arrivals)
        kind = {"default": K_DEFAULT, "random": K_RANDOM, "pct": K_PCT, "replay": K_REPLAY,
                "prefix": K_PREFIX, "follow": K_FOLLOW}[spec["kind"]]
        X.store(S.gw(G_KIND), kind)
        seed = int(spec.get("seed", 0)) & M64
        X.store(S.gw(G_SEED), seed)
        X.store(S.gw(G_MINPRIO), PRIO_BIAS)
        plan = spec.get("plan") or []
        if len(plan) > S.nsteps:
            raise UsageError("schedule", f"{len(plan)} decisions; this machine's log holds "
                             f"{S.nsteps} (MachineConfig.sched_steps)")
        self._plan[:len(plan)] = memoryview(struct.pack(f"<{len(plan)}H", *plan)).cast("H")
        X.store(S.gw(G_NPLAN), len(plan))
        if raise_phase_bit:
            X.store(S.gw(G_RAISE), RAISE_PENDING)
            X.store(S.gw(G_RAISE_BIT), raise_phase_bit)
        if dom0_vseen is not None:
            X.store(S.gw(G_DOM0_VSEEN), dom0_vseen)
            X.store(S.gw(G_DOM0_ON), 1)
        if kind == K_PCT:
            late = [c for c in (others or []) if c not in targets]
            self._load_pct(targets, int(spec["depth"]), int(spec["k"]), seed,
                           late + ([S.n] if raise_phase_bit else []),
                           dom0=dom0_vseen is not None)
        jid = X.fetch_add(S.gw(G_JOIN), 1) + 1
        for c in range(S.n):
            w = [S.cw(c, k) for k in range(C_WORDS)]
            X.store(w[C_STATE], IDLE)
            X.store(w[C_PART], self.epoch if c in targets else 0)
            X.store(w[C_FIRST], 1 if c in targets else 0)
            X.store(w[C_JOIN], jid if c in targets else 0)
        X.store(S.gw(G_EPOCH), self.epoch)

    def _load_pct(self, targets: list[int], d: int, k: int, seed: int,
                  late: list[int] | None = None, dom0: bool = False) -> None:
        X, S = self.X, self.S
        X.store(S.gw(G_DEPTH), d)
        # Random distinct priorities 2(d+1) .. 2(d+n), even (Fisher-Yates on
        # splitmix64); with ``late`` (processes that join later, and the raise as S.n),
        # over all of them. Change points set priorities 1 .. d-1, below all.
        who = list(targets) + list(late or [])
        prios = list(range(d + 1, d + 1 + len(who)))
        r = seed
        for i in range(len(prios) - 1, 0, -1):
            r = splitmix64(r)
            j = r % (i + 1)
            prios[i], prios[j] = prios[j], prios[i]
        for c, p in zip(who, prios, strict=True):
            X.store(S.gw(G_RAISE_PRIO) if c == S.n else S.cw(c, C_PRIO), PRIO_BIAS + 2 * p)
        # d-1 distinct change points in [1, k]
        cps: list[int] = []
        k = max(k, d)
        while len(cps) < d - 1:
            r = splitmix64(r)
            v = 1 + r % k
            if v not in cps:
                cps.append(v)
        for i, v in enumerate(cps):
            X.store(S.gw(G_CP + i), v)
        if dom0:
            # Dom0 gets an odd priority, uniformly in one of the len(who) + 1 gaps: the
            # others' priorities and change points stay those of a trial without it.
            r = splitmix64(r ^ 0xD0D0)
            X.store(S.gw(G_DOM0_PRIO), PRIO_BIAS + 2 * (d + 1 + r % (len(who) + 1)) - 1)

    # -- the coordinator's steps (a second wave, a poll round's start) -------------------
    def turn_is_raise(self) -> bool:
        return self.X.load(self.S.gw(G_TURN)) == self.S.n

    def turn_is_dom0(self) -> bool:
        return self.X.load(self.S.gw(G_TURN)) == self.S.n + 1

    def dom0_on(self) -> bool:
        return bool(self.X.load(self.S.gw(G_DOM0_ON)))

    def dom0_state(self, busy: bool, vseen: int) -> None:
        """After a Dom0 step (the coordinator's turn): has Dom0 a request to come, and
        the VIRQ count it has been told of."""
        self.X.store(self.S.gw(G_DOM0_BUSY), 1 if busy else 0)
        self.X.store(self.S.gw(G_DOM0_VSEEN), vseen)

    def dom0_off(self) -> None:
        """Dom0 leaves the schedule (it died, or did not answer)."""
        self.X.store(self.S.gw(G_DOM0_ON), 0)

    def raise_pending(self) -> bool:
        return self.X.load(self.S.gw(G_RAISE)) == RAISE_PENDING

    def mark(self, cpus: list[int]) -> None:
        """Mark ``cpus`` to join (a second wave) and count their arrivals; call before
        the signals go out. The raise is done."""
        X, S = self.X, self.S
        jid = X.fetch_add(S.gw(G_JOIN), 1) + 1
        for c in cpus:
            X.store(S.cw(c, C_PART), self.epoch)
            X.store(S.cw(c, C_JOIN), jid)
        X.fetch_add(S.gw(G_PARTS), 1)
        X.store(S.gw(G_RAISE), RAISE_DONE)
        X.fetch_add(S.gw(G_EXPECT), len(cpus))

    def arrived(self, n: int) -> bool:
        return self.X.load(self.S.gw(G_ARRIVED)) >= n

    def arrive(self) -> None:
        """The coordinator's own arrival (``extra_arrivals``): if it is the last, it
        makes the first choice."""
        X, S = self.X, self.S
        if X.fetch_add(S.gw(G_ARRIVED), 1) + 1 >= X.load(S.gw(G_EXPECT)) and \
                X.load(S.gw(G_TURN)) == NONE:
            self.choose_and_hand()

    def choose_and_hand(self, after_dom0: bool = False) -> None:
        """Make the next choice for the processes (the coordinator holds the turn:
        after a raise, a Dom0 step, or as the last arrival) and hand the turn over."""
        ch = Sched(self.R, None, self.S)
        q = ch.choose(self.S.n + 1 if after_dom0 else NONE)
        if q >= 0:
            ch._hand(q)

    def ring(self, cpus) -> None:
        ch = Sched(self.R, None, self.S)
        for c in cpus:
            ch.ring(c)

    def over(self) -> int:
        return self.X.load(self.S.gw(G_OVER))

    # The banks before the #MC are part of a trial's input (earlier trials leave errors
    # the handler does not clear, and logout logs whatever is valid): a token carries
    # their non-zero STATUS/ADDR/MISC words, and a replay puts them back first.
    def bank_state(self) -> list[list[int]]:
        HW, base = self.R.HW, self.R.HL.banks
        out = []
        for k in range(self.R.topo.ninst * NREGS):
            if k % NREGS in _DATA_REGS:
                v = HW.load(base + 8 * k)
                if v:
                    out.append([k, v])
        return out

    def restore_banks(self, state) -> None:
        HW, base = self.R.HW, self.R.HL.banks
        for k in range(self.R.topo.ninst * NREGS):
            if k % NREGS in _DATA_REGS:
                HW.store(base + 8 * k, 0)
        for k, v in state:
            if not (0 <= int(k) < self.R.topo.ninst * NREGS and k % NREGS in _DATA_REGS):
                raise UsageError("schedule", "the token's bank state does not fit this machine")
            HW.store(base + 8 * int(k), int(v) & M64)

    def deadlock(self, phases) -> dict:
        """Who waits on what (names resolved), for the finding."""
        X, S = self.X, self.S
        procs = []
        for c in range(S.n):
            if X.load(S.cw(c, C_PART)) != self.epoch:
                continue
            st = X.load(S.cw(c, C_STATE))
            item = {"cpu": c, "state": STATE_NAME[st] if st < len(STATE_NAME) else st,
                    "phase": phases(c)}
            if st == BLOCKED:
                off = X.load(S.cw(c, C_BOFF))
                item["waits_on"] = self._names.get(off, f"channel@{off:#x}")
            procs.append(item)
        waiting = [p for p in procs if p["state"] == "blocked"]
        text = "; ".join(f"cpu{p['cpu']} ({p['phase']}) waits on {p['waits_on']}"
                         for p in waiting)
        return {"processes": procs, "waiting": [p["cpu"] for p in waiting], "text": text}

    def result(self) -> dict:
        X, S = self.X, self.S
        n = X.load(S.gw(G_STEP))
        kept = min(n, S.nsteps)
        raw = struct.unpack_from(f"<{2 * kept}Q", self.R.xen_map, S.log)
        choices, trace, enabled, cur = [], [], [], []
        for i in range(kept):
            a, m = raw[2 * i], raw[2 * i + 1]
            q, site, c = a & 0xFFFF, (a >> 16) & 0xFFFF, (a >> 32) & 0xFFFF
            choices.append(q)
            trace.append((q, site))
            enabled.append(m)
            cur.append(-1 if c == NONE else c)
        div = X.load(S.gw(G_DIVERGED))
        out = {"strategy": self.spec.get("name", self.spec.get("kind")),
               "seed": self.spec.get("seed"), "steps": n,
               "log_full": n > S.nsteps, "choices": choices, "enabled": enabled,
               "current": cur, "trace": ["raise" if q == S.n else "dom0" if q == S.n + 1
                                          else f"cpu{q}:{site_name(s)}" for q, s in trace],
               "trace_digest": trace_digest(trace), "spins": X.load(S.gw(G_SPINS)),
               "over": ("running", "done", "reset", "deadlock")[X.load(S.gw(G_OVER))],
               "diverged": None}
        if self.spec.get("kind") == "follow":
            out["follow"] = {"entries": X.load(S.gw(G_NPLAN)),
                             "followed": X.load(S.gw(G_FPTR)),
                             "misses": X.load(S.gw(G_FMISS))}
        if self.spec.get("kind") == "pct":
            out["pct"] = {"depth": self.spec["depth"], "k": self.spec["k"]}
        if div:
            why = X.load(S.gw(G_DIV_WHY))
            out["diverged"] = {"step": div - 1, "reason": (
                (f"the token chose cpu{why & 0xFFFF}, which could not run"
                 if why & 0xFFFF < S.n else "the token raised the second #MC wave where "
                 "it could not be raised" if why & 0xFFFF == S.n else "the token chose "
                 "Dom0 where it had no request to make")
                if why >> 16 == DIV_NOT_ENABLED else "the run went past the token's end")}
        return out


def _channel_names(L) -> dict[int, str]:
    """Event-channel offsets → what a waiter on them waits for."""
    from emu.xen import barrier
    names = {L.mce_logout_lock + 8: "mce_logout_lock", L.halt_ev: "halt",
             L.boot_ev: "boot", L.process_lock + 8: "mce_process_lock",
             L.call_ev: "on_each_cpu (call_pending == 0)",
             L.mask_ev: "a cpumask (xen-2009-03: cpus_weight == num_online_cpus)",
             L.cmci_discover_lock + 8: "cmci_discover_lock",
             L.mce_enter_lock + 8: "mce_enter_lock"}
    for bar in ("mce_trap_bar", "mce_inside_bar", "mce_severity_bar"):
        off = getattr(L, bar)
        names[off + barrier.EV_IN] = f"{bar} (enter: val == num_online_cpus)"
        names[off + barrier.EV_OUT] = f"{bar} (exit: val == 0)"
    for c in range(L.ncpus):
        names[L.pc(c, L.P_KICK)] = f"softirq kick cpu{c}"
    return names


def summary(res: dict) -> dict:
    """What a replay must give again: the yield-point trace (its digest), the owners
    of every error and the outcome."""
    return {"digest": res["sched"]["trace_digest"], "outcome": res["outcome"],
            "owners": [e["owners"] for e in res["errors"]]}


def scenario_header(errors, local: bool, then: dict | None = None,
                    via: str | None = None) -> dict:
    """What a token says the trial injected (its replay injects the same)."""
    out = {"errors": list(errors), "local": bool(local)}
    if then:
        out["then"] = {"errors": list(then["errors"]), "after_phase": then["after_phase"],
                       "local": bool(then.get("local"))}
    if via:
        out["via"] = via
    return out


def controlled_record(res: dict, cfg, errors, local: bool, then: dict | None = None,
                      via: str | None = None) -> None:
    """Put the trial's token and its replay command in ``res["sched"]``."""
    from emu import __version__
    sc = res["sched"]
    header = {"emu": __version__, "handler": cfg.handler, "machine": machine_header(cfg),
              "strategy": sc["strategy"], "seed": sc.get("seed"),
              "scenario": scenario_header(errors, local, then, via),
              "banks": sc.get("banks_before") or [],
              "expect": summary(res)}
    if sc["log_full"]:
        sc["token"] = None
        sc["replay"] = (f"no token: the trial took {sc['steps']} steps, more than the "
                        f"decision log holds (sched_steps={cfg.sched_steps})")
        return
    sc["token"] = encode_token(header, sc["choices"])
    sc["replay"] = f"emu replay --schedule {sc['token']}"


def k_estimate(ncpus: int) -> int:
    """PCT's k before a first run has counted it: about what a broadcast #MC takes per
    CPU (yield points and waits of handler and softirq)."""
    return 80 * ncpus


def resolve(cfg, schedule, seed: int | None, k: int | None, errors, local: bool,
            then: dict | None = None) -> dict:
    """A strategy (text, or a spec dict from an explorer) → the spec the coordinator
    loads. ``k``: PCT's step count learned from an earlier run (None: estimate)."""
    if cfg.sched != "controlled":
        raise UsageError("schedule", "this machine is not controlled: boot it with "
                         "sched='controlled' (--sched controlled)")
    if isinstance(schedule, dict):
        return dict(schedule)
    st = parse_strategy(schedule or "random")
    seed = int(cfg.seed if seed is None else seed) & M64
    if st["kind"] == "random":
        return {"kind": "random", "seed": seed, "name": "random"}
    if st["kind"] == "pct":
        return {"kind": "pct", "seed": seed, "depth": st["depth"],
                "k": int(k or k_estimate(cfg_ncpus(cfg))), "name": f"pct:{st['depth']}"}
    if st["kind"] == "replay":
        header, plan = decode_token(st["token"])
        check_token_machine(header, cfg)
        want = header.get("scenario") or {}
        given = scenario_header(errors, local, then, want.get("via"))
        if given != dict(want, errors=list(want.get("errors") or []),
                         local=bool(want.get("local"))):
            raise UsageError("schedule", f"the token was recorded for errors "
                             f"{want.get('errors')} (local={want.get('local')}"
                             + (f", then={want['then']}" if want.get("then") else "")
                             + "); give those, or use emu replay --schedule TOKEN")
        return {"kind": "replay", "plan": plan, "seed": header.get("seed"),
                "name": "replay", "expect": header.get("expect"),
                "banks": header.get("banks") or []}
    raise UsageError("strategy", f"{schedule!r} explores many trials, not one: use "
                     "emu run --sched controlled --strategy dfs:P, or "
                     "emu.campaign.controlled.explore()")


def cfg_ncpus(cfg) -> int:
    from emu.hw.topology import parse_topology
    s, c, t = parse_topology(cfg.topology)
    return s * c * t


def replay_verdict(res: dict, expect: dict | None) -> str:
    """``reproduced`` only if the run followed the token (no divergence) and gave the
    same trace, owners and outcome; ``diverged`` otherwise (never a false
    reproduction)."""
    if res["sched"].get("diverged") or not expect:
        return "diverged"
    return "reproduced" if summary(res) == expect else "diverged"
