"""The delivery worker: claims due deliveries with leases, renders, sends, records, schedules.

One loop claims batches of due deliveries (store/deliveries.py keeps per-call-and-user order) and
runs each in its own task, bounded by ``worker_concurrency``. Each delivery: fetch the user's token
(single-flight refresh in delivery/oauth.py), render the mapping with it (render.py), check the URL
against the outbound guard (delivery/egress.py), send it with the CRM client (delivery/crm_client.py:
keep-alive HTTP/1.1 behind the guard, delivery/http1.py) under the per-host cap, classify the
outcome with the one pure function (delivery/retry.py), and record the attempt and the new state in
one transaction that only counts if the lease is still ours.

Fresh deliveries mostly skip the claim: the pipeline inserts the first delivery of an ordering key
already leased and hands it over in memory (``reserve`` before its transaction, ``accept`` after the
commit; pipeline.py). The claim loop runs ``claim_due`` only when there may be claimable work: the
pipeline left deliveries ``pending`` (no room, or waiting behind an in-flight one of their key, then
when that one finishes), a retry was scheduled, an operator replayed or un-parked (``wake()``), or
the timer fired (at most a second, or when the earliest retry or lease comes due).

Completions are group-committed: a finished task queues its outcome and one flusher writes every
queued outcome in one transaction (``store.deliveries.complete_many``, still conditional on the
claim token). A task keeps its place until its outcome is committed, so the next delivery of a call
becomes claimable only after its predecessor's completion is stored.

Graceful stop (reliability.md §20): stop claiming, let in-flight requests finish for up to the grace
period, cancel the rest and return their deliveries to the queue.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import logging
import random
import time
from collections import Counter
from collections.abc import Collection, Coroutine, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from functools import partial

from sqlalchemy.exc import OperationalError
from sqlmodel import Session

from cti_bridge.clock import Clock, SystemClock, xelion_time
from cti_bridge.config import Settings
from cti_bridge.delivery.crm_client import CrmClient
from cti_bridge.delivery.egress import HostLimiter, find_refusal, netloc_of
from cti_bridge.delivery.oauth import (
    AccessToken,
    ReauthRequired,
    TokenEndpointError,
    TokenManager,
    TokenNotReady,
)
from cti_bridge.delivery.retry import (
    SEND_ERRORS,
    Outcome,
    classify,
    classify_after_refresh,
    next_delay,
    parse_retry_after,
)
from cti_bridge.el import TemplateError
from cti_bridge.logs import FailureStreak
from cti_bridge.metrics import Metrics
from cti_bridge.pipeline import HandoffRoom
from cti_bridge.render import (
    CompiledMapping,
    RenderContext,
    RenderedRequest,
    echo_forms,
    mask,
    mask_excerpt,
    mask_order,
    mask_ordered,
)
from cti_bridge.routing import MappingCache
from cti_bridge.store.db import Database, retry_transient
from cti_bridge.store.deliveries import (
    AttemptRecord,
    Claimed,
    Completion,
    claim_due,
    complete_many,
    next_due_at,
    pending_keys,
    recorded_attempts,
    release,
    release_all_leases,
)
from cti_bridge.store.integrations import CREDENTIALS_DELETED

log = logging.getLogger(__name__)

EXCERPT_BYTES = 4096
#: Completions are written together: at most this many in one transaction, gathered for at most
#: FLUSH_DELAY seconds (while a flush runs, the next batch gathers by itself).
FLUSH_MAX = 256
FLUSH_DELAY = 0.002
#: Mappings whose CRM host the worker remembers at most (``_learn_host``).
MAX_KNOWN_MAPPINGS = 4096
#: Under a backlog, a claim for only a few places first waits this long for more to free.
CLAIM_GATHER = 0.005
#: How long a claim that found nothing beyond the full hosts' mappings is trusted (``_idle``):
#: work nobody told this worker of (another replica's, a retry's due time) waits at most this.
IDLE_TRUST = 1.0
#: CRM hosts whose failures the worker counts at most (``_host_failed``): one failing for ever and
#: used no more is kept until then, so a bound; the oldest streak goes, without a line.
MAX_FAILING_HOSTS = 1024


def _about(item: Claimed) -> str:
    """Whose delivery ``item`` is and of which call, for its log lines: the Xelion user, the
    credential (``api/users/{id}``), the callId and the event. (The integration is not among what
    a claim reads.)"""
    call = item.payload.get("callId")
    if call is None:
        call = item.ordering_key.rpartition("|")[0]
    credential = "" if item.credential_id is None else f", credential {item.credential_id}"
    return f"user {item.xelion_username}{credential}, call {call}, {item.notification_type}"


def _excerpt(data: bytes | None, ordered: tuple[str, ...]) -> str | None:
    """The first EXCERPT_BYTES of a body as stored, secrets masked. A body cut there may end in
    the start of a secret, masked too (``mask_excerpt``; a character cut in two is left out, so
    that the end still matches the start of a secret); the rest, nearly every body, is whole."""
    if data is None:
        return None
    if len(data) <= EXCERPT_BYTES:
        return mask_ordered(data.decode("utf-8", errors="replace"), ordered)
    return mask_excerpt(_UTF8(errors="replace").decode(data[:EXCERPT_BYTES], final=False), ordered)


_UTF8 = codecs.getincrementaldecoder("utf-8")


@dataclass
class _Result:
    """How one delivery attempt ended; turned into a state change by ``_finish``."""

    state: str  # delivered | pending | dead | parked
    outcome: str
    status: int | None = None
    error: str | None = None
    delay: float | None = None
    count_attempt: bool = True
    method: str = "POST"
    url: str = ""
    request_body: bytes | None = None
    response_body: bytes | None = None
    secrets: tuple[str, ...] = ()
    #: The CRM host (netloc, lower case) the request went to; None when none was sent.
    host: str | None = None


#: An outcome waiting for its group commit: the completion, the future its task waits on, and the
#: delivery's ordering key.
_Queued = tuple[Completion, asyncio.Future[str | None], str]


def _write_completions(
    session: Session, *, completions: list[Completion], keys: list[str], now: datetime, again: bool = False
) -> tuple[list[str | None], set[str]]:
    """One flush: the state each outcome wrote (None: its lease was lost), and which of the
    finished deliveries' calls have a successor ``pending`` (claimable now that its predecessor is
    stored).

    ``again``: the batch is written again after an error. If that error came after the first
    COMMIT applied (a connection lost while it answered), its outcomes no longer apply, yet were
    recorded: their attempts are in the log, and they count as written, not as leases lost."""
    written = complete_many(session, completions, now=now)
    if again and None in written:
        missing = [c for c, state in zip(completions, written, strict=True) if state is None]
        recorded = recorded_attempts(session, missing)
        written = [
            c.state if state is None and c.delivery_id in recorded else state
            for c, state in zip(completions, written, strict=True)
        ]
    finished = [key for key, state in zip(keys, written, strict=True) if state in ("delivered", "dead")]
    return written, pending_keys(session, finished)


class DeliveryWorker:
    """Sends deliveries until stopped. One per process; several processes may share PostgreSQL."""

    def __init__(
        self,
        *,
        db: Database,
        mappings: MappingCache,
        tokens: TokenManager[int],
        crm: CrmClient,
        settings: Settings,
        metrics: Metrics | None = None,
        clock: Clock | None = None,
        rng: random.Random | None = None,
        sole_owner: bool = False,
    ) -> None:
        self.db = db
        self.mappings = mappings
        self.tokens = tokens
        self.crm = crm
        self.settings = settings
        self.metrics = metrics
        self.clock = clock or SystemClock()
        self.rng = rng or random.Random()
        # With an embedded SQLite database this process is the only worker (the instance lock
        # guarantees it), so leases left by a crashed predecessor can be released at once.
        self.sole_owner = sole_owner
        self.limiter = HostLimiter(settings.per_host_concurrency)
        # Fairness between CRM hosts (reliability.md §9). The per-host semaphore alone is not
        # enough: a delivery waiting for one of a slow host's slots still holds one of the worker's
        # places, so a slow CRM with a backlog would take them all and starve every other CRM. So
        # one host holds at most twice its cap of places (the requests in flight, and as many ready
        # to take a freed slot at once), never every place, and claims skip the mappings whose host
        # is at that bound. A delivery's host is known only once rendered, so a mapping's host is
        # the one its last request went to (a mapping not sent yet counts as a host of its own).
        # The bound also keeps a delivery's wait for a slot to about one request timeout, which the
        # lease (§4) covers.
        self._host_cap = max(1, min(2 * settings.per_host_concurrency, settings.worker_concurrency - 1))
        # A claim for fewer places than this waits CLAIM_GATHER for more to free (see _loop_once).
        self._claim_batch = max(1, min(settings.worker_concurrency, self._host_cap) // 4)
        self._mapping_host: dict[int, str] = {}
        self._host_load: dict[str, int] = {}
        self._counted_at: dict[asyncio.Task[None], str] = {}  # which host a task is counted at
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._inflight: dict[str, tuple[asyncio.Task[None], Claimed]] = {}
        # Those of them past their request, waiting for their outcome's commit (``_free``).
        self._finishing: set[asyncio.Task[None]] = set()
        self._loop_task: asyncio.Task[None] | None = None
        # Places promised but not yet taken: to an ingest batch (``reserve``) or to a claim running.
        self._reserved = 0
        # A database outage fails every claim: one traceback per streak, not one per claim.
        self._claim_failures = FailureStreak(log, "the delivery worker's claim")
        # The CRM hosts whose requests are failing, with their streak (``_host_failed``). A retried
        # failure is stored with its delivery but was not logged: in a CRM outage the first line
        # came when the first delivery went dead, ten hours in. A line per retried failure would be
        # thousands a minute; a streak per host is its first failure, a count a minute, and one
        # line when the host answers again.
        self._host_failures: dict[str, FailureStreak] = {}
        # Whether pending deliveries may be claimable (``_backlog_gen`` counts the reasons given,
        # so that a claim that started before one does not clear it).
        self._backlog = False
        self._backlog_gen = 0
        # Ordering keys of running deliveries (until their task ends, after their completion is
        # committed), and those of them that have a successor waiting in the queue.
        self._running_keys: Counter[str] = Counter()
        self._key_of: dict[tuple[str, str], str] = {}  # (delivery id, claim) -> ordering key
        self._waiting_keys: set[str] = set()
        self._completions: list[_Queued] = []
        self._flusher: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()
        # No hand-off before run() has released a predecessor's leases (sole owner): that release
        # would void a lease just handed over, and the delivery would be sent twice.
        self._ready = not sole_owner
        self._now_second = -1
        self._now_formatted = ""
        # The last answer of next_due_at (see _next_due): when, for which skipped mappings, and
        # whether a retry scheduled since makes it stale.
        self._due_at: datetime | None = None
        self._due_checked = -1e9
        self._due_skip: list[int] = []
        self._due_dirty = True
        # A claim that skipped the mappings of full hosts and came back short found everything
        # else claimed. Until work outside those mappings is heard of (``_more_work``), another
        # claim skipping them (or more) would find nothing again, at the price of walking the full
        # hosts' whole backlog past its NOT IN: 1.4 ms for 15,000 pending, and under a burst the
        # pipeline's every batch woke the worker into such a claim while its one host was full.
        self._idle_skip: frozenset[int] | None = None
        self._idle_until = 0.0

    # -- control -----------------------------------------------------------------------------

    def wake(self, mappings: Collection[int] | None = None) -> None:
        """New claimable work may have been committed: claim now rather than at the next timer.
        ``mappings``: the mappings of that work, when known (an ingest batch's queued deliveries);
        None: any."""
        self._more_work(mappings)
        self._wake.set()

    def _more_work(self, mappings: Collection[int] | None) -> None:
        """Pending deliveries of ``mappings`` (None: any) may be claimable: there is a backlog
        (``_backlog_gen`` counts these, so that a claim under way can tell), and unless all of
        them are ones the last idle claim skipped, the next claim must look."""
        self._backlog = True
        self._backlog_gen += 1
        if mappings is None or self._idle_skip is None or not self._idle_skip.issuperset(mappings):
            self._idle_skip = None

    def _idle(self, skip: list[int]) -> bool:
        """Whether a claim skipping ``skip`` would find nothing (see ``_idle_skip``): it skips at
        least what the last idle claim skipped, nothing was heard of outside that since, no retry
        was scheduled since (``_due_dirty``), and the database's next due time for these skipped
        mappings has not come."""
        if self._idle_skip is None or self._due_dirty or self.clock.monotonic() >= self._idle_until:
            return False
        if not self._idle_skip.issubset(skip):
            return False
        due = self._due_at
        return not (skip == self._due_skip and due is not None and due <= self.clock.now())

    # -- hand-off from the pipeline --------------------------------------------------------------

    def reserve(self, want: int) -> HandoffRoom | None:
        """Reserve places for up to ``want`` fresh deliveries of an ingest batch (pipeline.py).

        The room respects ``worker_concurrency`` and the per-host fairness bound exactly as a claim
        does (``_claim_window``); until ``accept`` gives it back, claims count it as taken at every
        host, so claims and hand-offs together never overshoot.
        """
        if self._stopping.is_set() or not self._ready:
            return None
        _skip, limit = self._claim_window(self._free())
        n = min(want, limit)
        if n <= 0:
            return None
        cap = self._host_cap
        room = HandoffRoom(
            slots=n,
            lease_seconds=self.settings.lease_seconds,
            host_room={h: cap - load - self._reserved for h, load in self._host_load.items()},
            default_host_room=cap - self._reserved,
            mapping_host=dict(self._mapping_host),
            reserved=n,
            leased_at=self.clock.monotonic(),  # the ingest's lease starts after this
        )
        self._reserved += n
        return room

    def accept(
        self,
        room: HandoffRoom | None,
        claimed: Sequence[Claimed],
        queued_mappings: Sequence[int],
        blocked_keys: Sequence[str],
    ) -> None:
        """An ingest batch committed: start the deliveries it leased to us, give back the rest of
        the reservation, and note what it left ``pending`` (see ``Handoff.accept``)."""
        if room is not None:
            self._reserved -= room.reserved
        if claimed and self._stopping.is_set():
            # Cannot happen through serve() (the pipeline is flushed before the worker stops); if it
            # does, the deliveries go back to the queue rather than wait for their lease.
            self._spawn(self._release([(c.claim, c.id) for c in claimed]))
        else:
            leased_at = room.leased_at if room is not None else None
            for item in claimed:
                self._start(item, leased_at)
        known: Collection[int] | None = queued_mappings
        wake = bool(queued_mappings)
        for key in blocked_keys:
            if self._running_keys.get(key):
                self._waiting_keys.add(key)  # woken when that delivery's task ends
            else:
                wake, known = True, None  # blocked by one that is not ours, or that just finished
        if wake:
            self.wake(known)

    def _spawn(self, coro: Coroutine[object, object, None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _release(self, claims: list[tuple[str, str]]) -> None:
        now = self.clock.now()
        by_claim: dict[str, list[str]] = {}
        for claim, delivery_id in claims:
            by_claim.setdefault(claim, []).append(delivery_id)
        for claim, ids in by_claim.items():
            await self.db.run(partial(release, delivery_ids=ids, claim=claim, now=now))

    async def run(self) -> None:
        """Claim and send until ``stop()``.

        Cancellation: cancels in-flight sends and returns their deliveries to the queue.
        """
        if self.sole_owner:
            now = self.clock.now()
            released = await self.db.run(lambda s: release_all_leases(s, now=now))
            if released:
                log.info("returned %d deliveries leased by a previous run to the queue", released)
            self._ready = True
        try:
            await self._loop()
        finally:
            # After stop(), stop() itself drains with the grace period; cutting the in-flight
            # requests off here would void it (reliability.md §20). Only a cancelled run drains now.
            if not self._stopping.is_set():
                await self._drain(0.0)

    async def stop(self, grace: float | None = None) -> None:
        """Stop claiming, give in-flight requests ``grace`` seconds, return the rest to the queue."""
        self._stopping.set()
        self._wake.set()
        await self._drain(self.settings.shutdown_grace_seconds if grace is None else grace)

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    def _free(self) -> int:
        """Places for more deliveries: ``worker_concurrency`` less the deliveries before or in their
        request. Those past it, waiting for their outcome's group commit (``_finishing``), hold no
        CRM connection: counted as taken, they left a CRM with 32 connections and 63 places idle
        while half the places waited for the flush (``bench_e2e.py``: the daemon at 0.87 of its
        core). They count against a second ``worker_concurrency`` only, a bound for a database
        slower than the CRMs."""
        running = len(self._inflight)
        places = self.settings.worker_concurrency
        return min(places - (running - len(self._finishing)), 2 * places - running)

    # -- the loop ----------------------------------------------------------------------------

    async def _loop(self) -> None:
        """Claim until stopped. A database error (a PostgreSQL restart, a dropped connection) is
        logged and waited out with a growing pause: it must not end the worker, and with it the
        daemon, while the pipeline rides out the same blip (reliability.md §1, §20)."""
        pause = 0.5
        while not self._stopping.is_set():
            try:
                await self._loop_once()
                pause = 0.5
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._claim_failures.failed(exc, f"trying again in {pause:.1f} s")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), pause)
                pause = min(pause * 2, 10.0)

    async def _loop_once(self) -> None:
        """One claim, then a wait for a wake-up or the next due time (at most a second)."""
        if self._host_failures:
            # A failing host's count is logged on time even when no more of its requests fail
            # (their deliveries all wait for a retry): the loop comes by at least once a second.
            for host, streak in list(self._host_failures.items()):
                streak.tick()
                if streak.idle():
                    del self._host_failures[host]
        lease = self.settings.lease_seconds
        if self._stopping.is_set():
            return
        self._wake.clear()
        full, limit = self._claim_window(self._free())
        if 0 < limit < self._claim_batch and self._inflight:
            # Under a backlog, places free one at a time as requests finish, and a claim per place
            # costs a transaction per delivery. Let a few gather first: the deliveries already
            # waiting for a slot of their host keep the CRM busy meanwhile.
            await asyncio.sleep(CLAIM_GATHER)
            if self._stopping.is_set():
                return
            self._wake.clear()
            full, limit = self._claim_window(self._free())
        claimed: list[Claimed] = []
        idle = limit > 0 and bool(full) and self._idle(full)
        if idle:
            pass  # nothing to claim beyond the full hosts: wait as after an empty claim
        elif limit > 0:
            now = self.clock.now()
            leased_at = self.clock.monotonic()
            gen = self._backlog_gen
            self._reserved += limit  # a hand-off meanwhile must not take the same places
            try:
                claimed = await self.db.run(
                    partial(
                        claim_due,
                        now=now,
                        limit=limit,
                        lease_seconds=lease,
                        skip_mappings=full,
                        skip_ids=list(self._inflight),  # a copy: PostgreSQL runs it in a thread
                    ),
                    quick=True,
                )
            finally:
                self._reserved -= limit
            self._claim_failures.recovered()
            if self._stopping.is_set():
                # stop() came while the claim was in the database: these must not start after
                # the drain; they go straight back to the queue.
                await self._release([(c.claim, c.id) for c in claimed])
                return
            for item in claimed:
                self._start(item, leased_at)
            if full and len(claimed) < limit and gen == self._backlog_gen:
                self._idle_skip, self._idle_until = frozenset(full), leased_at + IDLE_TRUST
            if len(claimed) == limit:
                self._backlog = True  # there may be more: claim again when a place frees
            elif gen == self._backlog_gen and not full:
                # Everything claimable was claimed (a claim that skipped a busy host's mappings
                # may have left some of theirs: those wait for a place, the backlog stays).
                self._backlog = False
        if limit > 0 and len(claimed) == limit:
            return  # a full batch: there may be more due right now
        timeout = 1.0
        if not claimed and limit > 0:
            due = await self._next_due(full)
            if due is not None:
                timeout = min(1.0, max(0.05, (due - self.clock.now()).total_seconds()))
        if idle:
            # What the idle claim found is trusted until IDLE_TRUST ends, and no longer: the next
            # claim comes then, not a full timeout after a wake-up just before it.
            timeout = min(timeout, max(0.05, self._idle_until - self.clock.monotonic()))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout)

    async def _next_due(self, skip: list[int]) -> datetime | None:
        """When the earliest claimable delivery or lease comes due (``next_due_at``), asked of the
        database at most once a second unless this worker scheduled a retry since, the time asked
        for has passed, or the skipped mappings changed. The loop wakes at least once a second and
        claims whatever is due then, so the answer only makes a retry of this worker's, due sooner,
        start on time; re-asking after every empty claim (nearly every wake-up under load) was two
        queries each time."""
        now = self.clock.monotonic()
        due = self._due_at
        if (
            self._due_dirty
            or now - self._due_checked >= 1.0
            or skip != self._due_skip
            or (due is not None and due <= self.clock.now())
        ):
            self._due_dirty = False
            self._due_checked, self._due_skip = now, skip
            due = self._due_at = await self.db.run(
                partial(next_due_at, skip_mappings=skip, skip_ids=list(self._inflight)), quick=True
            )
        return due

    def _start(self, item: Claimed, leased_at: float | None = None) -> None:
        """Run a leased delivery in its own task. ``leased_at``: the monotonic time no later than
        the start of its lease (before the claim's transaction), from which the lease's end is
        known without asking the database."""
        if item.id in self._inflight:
            # Our own earlier claim of it outlived its lease and is still running: the new claim
            # decides; the running one does not send once its lease is over (``_send``), and its
            # completion changes nothing.
            log.warning("delivery %s claimed again while still in flight here", item.id)
        start = self.clock.monotonic() if leased_at is None else leased_at
        task = asyncio.create_task(
            self._process(item, start + self.settings.lease_seconds), name=f"delivery-{item.id}"
        )
        self._inflight[item.id] = (task, item)
        self._count(task, self._host_of(item.mapping_id))
        self._running_keys[item.ordering_key] += 1
        self._key_of[(item.id, item.claim)] = item.ordering_key
        task.add_done_callback(partial(self._done, item))

    def _host_of(self, mapping_id: int) -> str:
        return self._mapping_host.get(mapping_id) or f"mapping {mapping_id}"

    def _claim_window(self, free: int) -> tuple[list[int], int]:
        """The mappings whose host is at its bound (skipped by the claim) and how many to claim at
        most: no more than the least room left at any busy host, so one batch cannot overshoot.
        Places reserved (a hand-off or a claim under way) count as taken, at every host."""
        cap = self._host_cap - self._reserved
        limit = min(free - self._reserved, cap)
        for load in self._host_load.values():
            if load < cap:
                limit = min(limit, cap - load)
        full_hosts = {host for host, load in self._host_load.items() if load >= cap}
        skip = [m for m, host in self._mapping_host.items() if host in full_hosts]
        skip += [int(h.removeprefix("mapping ")) for h in full_hosts if h.startswith("mapping ")]
        return skip, max(limit, 0)

    def _learn_host(self, mapping_id: int, host: str, task: asyncio.Task[None] | None) -> None:
        """``task`` rendered a request of ``mapping_id`` to ``host``: count it there, and if the
        mapping's host was not known yet, move its other deliveries from the placeholder to
        ``host`` too. Left at the placeholder, they would split one host's load over two counts
        and a claim would give that host more than its bound of places."""
        placeholder = f"mapping {mapping_id}"
        first = mapping_id not in self._mapping_host
        self._mapping_host[mapping_id] = host
        if first and len(self._mapping_host) > MAX_KNOWN_MAPPINGS:
            # Each PUT of the mappings makes new ids; the retired ones' hosts would be kept (and
            # copied for every ingest batch, scanned by every claim) for the process's life. The
            # oldest quarter goes; a mapping still in use is learnt again at its next request.
            for old in list(self._mapping_host)[: MAX_KNOWN_MAPPINGS // 4]:
                del self._mapping_host[old]
        if task is not None and task in self._counted_at:
            self._count(task, host)  # now that the host is known for sure
        if first:
            for other in [t for t, at in self._counted_at.items() if at == placeholder]:
                self._count(other, host)

    def _count(self, task: asyncio.Task[None], host: str | None) -> None:
        """Count ``task`` at ``host`` (None: nowhere any more), uncounting it where it was."""
        before = self._counted_at.pop(task, None)
        if before is not None:
            load = self._host_load.get(before, 0) - 1
            if load > 0:
                self._host_load[before] = load
            else:
                self._host_load.pop(before, None)
        if host is not None:
            self._counted_at[task] = host
            self._host_load[host] = self._host_load.get(host, 0) + 1

    def _done(self, item: Claimed, task: asyncio.Task[None]) -> None:
        entry = self._inflight.get(item.id)
        if entry is not None and entry[0] is task:
            del self._inflight[item.id]
        self._count(task, None)
        self._finishing.discard(task)
        # A place is free: claim if pending work may be waiting for one.
        if self._key_done(item.id, item.claim) or self._backlog:
            self._wake.set()

    def _key_done(self, delivery_id: str, claim: str) -> bool:
        """The delivery's outcome is committed (or its task ended): it no longer holds its call.
        True if a successor the pipeline left waiting behind it may be claimable now."""
        key = self._key_of.pop((delivery_id, claim), None)
        if key is None:
            return False
        left = self._running_keys[key] - 1
        if left > 0:
            self._running_keys[key] = left
            return False
        del self._running_keys[key]
        if key in self._waiting_keys:
            self._waiting_keys.discard(key)
            self._more_work(None)
            return True
        return False

    async def _drain(self, grace: float) -> None:
        if self._inflight:
            tasks = [t for t, _ in self._inflight.values()]
            if grace > 0:
                await asyncio.wait(tasks, timeout=grace)
        left = list(self._inflight.values())
        for task, _ in left:
            task.cancel()
        await asyncio.gather(*(t for t, _ in left), return_exceptions=True)
        # Outcomes already queued are written before anything is released: a request that was
        # answered is recorded, not sent again (the release below then finds its lease gone).
        await self._flush_all()
        if left:
            await self._release([(item.claim, item.id) for _, item in left])
            log.info("returned %d unfinished deliveries to the queue", len(left))

    # -- group-committed completions -------------------------------------------------------------

    def _complete(self, completion: Completion, ordering_key: str) -> asyncio.Future[str | None]:
        """Queue an outcome for the flusher; the future tells (after the commit) the state it wrote,
        or None if it did not apply."""
        future: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        self._completions.append((completion, future, ordering_key))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush_loop(), name="completions")
        return future

    async def _flush_all(self) -> None:
        while self._completions or (self._flusher is not None and not self._flusher.done()):
            if self._flusher is None or self._flusher.done():
                self._flusher = asyncio.create_task(self._flush_loop(), name="completions")
            await asyncio.wait({self._flusher})

    async def _record(
        self, again: bool, *, completions: list[Completion], keys: list[str], now: datetime
    ) -> tuple[list[str | None], set[str]]:
        """One try of writing a batch of outcomes (``_write_completions``)."""
        unit = partial(_write_completions, completions=completions, keys=keys, now=now, again=again)
        return await self.db.run(unit, quick=True)

    async def _flush_loop(self) -> None:
        """Write queued outcomes, up to FLUSH_MAX per transaction, until none are left."""
        while self._completions:
            if len(self._completions) < FLUSH_MAX:
                await asyncio.sleep(FLUSH_DELAY)
            batch = self._completions[:FLUSH_MAX]
            del self._completions[:FLUSH_MAX]
            await self._flush(batch)

    async def _flush(self, batch: list[_Queued], *, bare: bool = False) -> None:
        """Write one batch of outcomes and answer their waiting tasks. ``bare``: the attempt's
        details were left out of this one, after it failed with them."""
        now = self.clock.now()
        completions = [c for c, _, _ in batch]
        try:
            # A database briefly away: these requests were answered, and left unrecorded they
            # would be sent again once their lease ends. Writing them again is safe: each
            # outcome applies only while its claim holds (_write_completions' ``again``).
            written, successors = await retry_transient(
                partial(self._record, completions=completions, keys=[k for _, _, k in batch], now=now),
                f"recording {len(batch)} delivery outcomes",
            )
        except OperationalError as exc:
            self._flush_failed(batch, exc)  # the database is away: nothing to single out
            return
        except Exception as exc:
            # Not transient: most likely one outcome's fault (a value the database refuses). Left
            # so, the whole batch went back to the queue at its leases' end, was sent again, met
            # the same outcome in one batch again, for ever, and the calls' next deliveries waited
            # behind it. One by one, only that outcome is affected; it is written once more
            # without the attempt's details, since its state matters more than its excerpt.
            if len(batch) > 1:
                log.warning(
                    "recording %d delivery outcomes failed (%s); writing them one by one", len(batch), exc
                )
                for item in batch:
                    await self._flush([item])
                return
            (completion, future, key) = batch[0]
            if bare:
                self._flush_failed(batch, exc)
                return
            log.error(
                "delivery %s: its outcome (%s) could not be recorded (%s); "
                "recording it without the attempt's details",
                completion.delivery_id,
                completion.state,
                exc,
            )
            attempt = replace(
                completion.attempt,
                error=f"the attempt's details could not be stored ({type(exc).__name__})",
                request_url="",
                request_excerpt=None,
                response_excerpt=None,
            )
            reason = "re-authorisation required" if completion.park_reason else ""
            bare_completion = replace(completion, attempt=attempt, park_reason=reason)
            await self._flush([(bare_completion, future, key)], bare=True)
            return
        wake = bool(successors)
        for c in completions:
            wake = self._key_done(c.delivery_id, c.claim) or wake
        if wake:
            self.wake()  # the next delivery of a call is claimable now that this one is stored
        for (_, future, _), state in zip(batch, written, strict=True):
            if not future.done():
                future.set_result(state)

    @staticmethod
    def _flush_failed(batch: list[_Queued], exc: Exception) -> None:
        """The deliveries stay leased and go back to the queue when their lease ends."""
        log.error("recording %d delivery outcomes failed: %s", len(batch), exc)
        for _, future, _ in batch:
            if not future.done():
                future.set_exception(exc)

    # -- one delivery ------------------------------------------------------------------------

    async def _process(self, item: Claimed, lease_end: float | None = None) -> None:
        started = self.clock.now()
        t0 = time.monotonic()
        try:
            result = await self._attempt(item, lease_end)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug must not kill the worker nor lose the delivery
            log.exception("delivery %s failed unexpectedly", item.id)
            # Through the schedule like any retry, so it ends dead rather than blocking its call forever.
            result = self._retry(
                item,
                _Result(
                    state="pending",
                    outcome="retry",
                    error=f"internal error: {type(exc).__name__}",
                    delay=30.0,
                ),
            )
        duration_ms = int((time.monotonic() - t0) * 1000)
        task: asyncio.Task[None] | None = asyncio.current_task()
        if task is not None:
            # Past its request: its place at the host and in the worker is free (``_free``).
            self._count(task, None)
            self._finishing.add(task)
            if self._backlog:
                self._wake.set()
        await self._finish(item, result, started, duration_ms)

    def _context(self, item: Claimed, token: AccessToken | None) -> RenderContext:
        token_view: dict[str, object] | None = None
        if token is not None:
            token_view = dict(token.extra)
            token_view["accessToken"] = token.access_token
        return RenderContext(
            event=item.payload,
            xelion_event=item.notification_type,
            user={
                "xelionUsername": item.xelion_username,
                "xelionOid": item.xelion_oid,
                "role": item.user_role,
            },
            token=token_view,
            delivery_id=item.id,
            now=self._now_text(),
        )

    def _now_text(self) -> str:
        """``now`` as templates see it (whole seconds): formatted once per second, not per delivery."""
        now = self.clock.now()
        second = int(now.timestamp())
        if second != self._now_second:
            self._now_second, self._now_formatted = second, xelion_time(now)
        return self._now_formatted

    async def _attempt(self, item: Claimed, lease_end: float | None = None) -> _Result:
        if item.credential_id is None:
            self._not_sent("credentials")
            return _Result(state="dead", outcome="dead", error=CREDENTIALS_DELETED)
        # The caches answer nearly every delivery: a coroutine only when they do not.
        compiled = self.mappings.peek(item.mapping_id)
        if compiled is None:
            mapping_id = item.mapping_id
            try:
                compiled = await self.db.run(lambda s: self.mappings.get(s, mapping_id))
            except (LookupError, TemplateError) as exc:
                self._not_sent("mapping")
                return _Result(state="dead", outcome="dead", error=f"mapping: {exc}")
        try:
            token = self.tokens.peek(item.credential_id) or await self.tokens.get(item.credential_id)
        except ReauthRequired as exc:
            self._not_sent("reauth_required")
            return _Result(state="parked", outcome="parked", error=f"re-authorisation required: {exc.reason}")
        except TokenNotReady as exc:
            return _Result(
                state="pending", outcome="retry", error=str(exc), delay=exc.retry_after, count_attempt=False
            )
        except TokenEndpointError as exc:
            self._not_sent("token_endpoint")
            if exc.retryable:
                # A throttled token endpoint's pause is a floor, as a CRM's Retry-After is.
                return self._retry(
                    item,
                    _Result(
                        state="pending",
                        outcome="retry",
                        error=f"token endpoint: {exc}",
                        delay=exc.retry_after,
                    ),
                )
            return _Result(state="dead", outcome="dead", error=f"token endpoint: {exc}")

        result = await self._send(item, compiled, token, lease_end=lease_end)
        if result.outcome == "refresh":
            try:
                token = await self.tokens.refresh_after_401(item.credential_id, token.access_token)
            except ReauthRequired as exc:
                self._not_sent("reauth_required")
                return _Result(
                    state="parked", outcome="parked", error=f"re-authorisation required: {exc.reason}"
                )
            except (TokenEndpointError, TokenNotReady) as exc:
                if isinstance(exc, TokenEndpointError):
                    self._not_sent("token_endpoint")
                return self._retry(
                    item,
                    _Result(
                        state="pending",
                        outcome="retry",
                        status=401,
                        error=f"token refresh: {exc}",
                        delay=exc.retry_after,
                    ),
                )
            result = await self._send(item, compiled, token, second_try=True, lease_end=lease_end)
        if result.state == "pending":
            return self._retry(item, result)
        return result

    def _not_sent(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.not_sent(reason)

    def _retry(self, item: Claimed, result: _Result) -> _Result:
        delay = next_delay(
            item.attempts + 1,
            self.settings.retry_schedule,
            self.settings.retry_jitter,
            self.rng,
            result.delay,
            self.settings.retry_after_cap_seconds,
        )
        if delay is None:
            result.state = "dead"
            result.outcome = "dead"
            result.error = f"gave up after {item.attempts + 1} attempts: {result.error}"
        else:
            result.delay = delay
        return result

    async def _send(
        self,
        item: Claimed,
        compiled: CompiledMapping,
        token: AccessToken,
        *,
        second_try: bool = False,
        lease_end: float | None = None,
    ) -> _Result:
        # The token as it is sent, and as a CRM may quote it back (encoded, escaped) in its answer.
        secrets: tuple[str, ...] = echo_forms(token.access_token)
        try:
            req: RenderedRequest = compiled.render(self._context(item, token), warnings=False)
        except TemplateError as exc:
            # The error's text comes masked from render.py (every string of the token view, in the
            # forms it can take there, cut short ones too), so what is stored and logged is masked.
            self._not_sent("render")
            return _Result(state="dead", outcome="dead", error=f"render: {exc}", secrets=secrets)
        secrets = (*secrets, *req.secret_values)
        host = netloc_of(req.url)
        lower = host.lower()
        base = _Result(
            state="dead",
            outcome="dead",
            method=req.method,
            url=req.url,
            request_body=req.body,
            secrets=secrets,
            host=lower,
        )
        # The outbound guard is CrmClient.send's first step (every request, a caller cannot forget
        # it); its refusal comes back as the error below and is reported as the guard's.
        headers = dict(req.headers)
        headers["Authorization"] = item.authorization_header_prefix + token.access_token
        headers["Idempotency-Key"] = item.id
        self._learn_host(item.mapping_id, lower, asyncio.current_task())
        status: int | None = None
        error: Exception | None = None
        body: bytes | None = None
        retry_after: float | None = None
        try:
            async with self.limiter.slot(host):
                if (
                    lease_end is not None
                    and self.clock.monotonic() + self.settings.request_timeout > lease_end
                ):
                    # The lease would end before the request could: a long wait for a token (another
                    # replica's refresh lock, a hung token endpoint) or for a place at the host. Another
                    # claim may already have it, in this process too, and would send it as well; so
                    # nothing is sent, and if the claim still holds it is tried again later.
                    self._not_sent("lease")
                    return _Result(
                        state="pending",
                        outcome="retry",
                        error="not sent: the lease would have ended before the request (a long wait)",
                        count_attempt=False,
                    )
                answer = await self.crm.send(
                    req.method, req.url, headers, req.body, max_bytes=self.settings.max_response_bytes
                )
            status, body = answer.status, answer.body
            retry_after = parse_retry_after(answer.retry_after, self.clock.now())
        except SEND_ERRORS as exc:
            error = exc
        if self.metrics is not None:
            self.metrics.attempt(status)
        base.status = status
        base.response_body = body
        # The one retry after a refresh: a second 401 is permanent (§6: refresh once, retry once).
        outcome = classify_after_refresh(status, error) if second_try else classify(status, error)
        if outcome is Outcome.SUCCESS:
            base.state, base.outcome = "delivered", "delivered"
            return base
        refused = find_refusal(error)
        if status is not None:
            reason = f"HTTP {status}"
        elif refused is not None:
            # A host name that resolves to a refused address is only caught when connecting; the
            # operator must read the same "outbound guard" reason as for an IP literal (§15).
            reason = f"refused by the outbound guard: {refused}"
        else:
            reason = f"{type(error).__name__}: {error}"
        base.error = mask(reason, secrets)
        if outcome is Outcome.REFRESH_AND_RETRY:
            base.state, base.outcome = "pending", "refresh"
            return base
        if outcome is Outcome.RETRY:
            base.state, base.outcome, base.delay = "pending", "retry", retry_after
            return base
        if second_try and status == 401:
            base.error = "HTTP 401 again with a freshly refreshed token"
        return base  # permanent: dead, with the status and the response excerpt

    async def _finish(self, item: Claimed, result: _Result, started: datetime, duration_ms: int) -> None:
        now = self.clock.now()
        ordered = mask_order(result.secrets)  # once for the four texts below
        if result.error:
            # A template error may quote an evaluated value, and that value may come from the token.
            result.error = mask_ordered(result.error, ordered)
        attempt = AttemptRecord(
            started_at=started,
            duration_ms=duration_ms,
            outcome=result.outcome,
            http_status=result.status,
            error=result.error,
            request_method=result.method,
            request_url=mask_ordered(result.url, ordered),
            request_excerpt=_excerpt(result.request_body, ordered),
            response_excerpt=_excerpt(result.response_body, ordered),
        )
        next_at = now + timedelta(seconds=result.delay) if result.delay is not None else None
        state = result.state
        if result.host is not None:
            # Only the CRM's own answers count for its host: not a token endpoint's failure, nor a
            # request not sent. Nothing but the check when no host is failing (the hot path).
            if state == "pending":
                if result.outcome == "retry":
                    self._host_failed(item, result, next_at, ordered)
            elif state == "delivered" and self._host_failures:
                streak = self._host_failures.get(result.host)
                if streak is not None:
                    streak.recovered()  # kept until idle: a flapping host's next failure is counted
        completion = Completion(
            delivery_id=item.id,
            claim=item.claim,
            state=state,
            attempt=attempt,
            next_attempt_at=next_at if state == "pending" else None,
            count_attempt=result.count_attempt,
            credential_id=item.credential_id if state == "parked" else None,
            park_reason=result.error or "",
        )
        # Queued before the wait: if this task is cancelled meanwhile, the flusher still writes the
        # outcome (it only skips answering a cancelled future), so no shield is needed.
        try:
            written = await self._complete(completion, item.ordering_key)
        except Exception:
            # The flusher logged the failed commit; the delivery stays leased and goes back to the
            # queue when its lease ends. Raised on, it ended this task as an exception nobody
            # retrieves, which asyncio logged a second time.
            return
        if written is None:
            log.info("delivery %s: lease lost before completion; the newer claim decides", item.id)
        else:
            if self.metrics is not None:
                self.metrics.finished(written)
            if written == "pending":
                self._due_dirty = True  # a retry is scheduled: let the loop take its time into account
                self._wake.set()
        if written is not None and written != state:
            # Parked, but an operator repaired the credential before the outcome was stored: the
            # delivery is due again (store.deliveries._resumed), not parked.
            log.info(
                "delivery %s: its credential was repaired meanwhile; due again (%s)", item.id, result.error
            )
            return
        if state == "delivered":
            log.debug("delivery %s delivered (HTTP %s) in %d ms", item.id, result.status, duration_ms)
        elif state != "pending" or result.outcome != "retry":
            # Dead is for an operator to look at (replay, a mapping to mend): a warning. The line
            # says whose and which call it was, so that it can be acted on without a query first.
            log.log(
                logging.WARNING if state == "dead" else logging.INFO,
                "delivery %s %s: %s (%s)",
                item.id,
                state,
                result.error,
                _about(item),
            )

    def _host_failed(
        self, item: Claimed, result: _Result, next_at: datetime | None, ordered: tuple[str, ...]
    ) -> None:
        """A request to ``result.host`` failed and its delivery will be retried: the first failure
        of the host's streak is logged with the delivery's details, the rest counted
        (``FailureStreak.noted``)."""
        host = result.host
        assert host is not None
        streak = self._host_failures.get(host)
        if streak is None:
            if len(self._host_failures) >= MAX_FAILING_HOSTS:
                del self._host_failures[next(iter(self._host_failures))]
            # No user info (a password) in a log line; a host drawn from the token is masked as in
            # the attempt record.
            shown = mask_ordered(host.rpartition("@")[2], ordered)
            streak = self._host_failures[host] = FailureStreak(
                log,
                f"CRM host {shown}",
                level=logging.WARNING,
                clock=self.clock.monotonic,
                works_again="answers again",
            )
        if result.status is not None:
            kind = f"HTTP {result.status}"
        else:
            kind = (result.error or "error").partition(":")[0]

        def first() -> str:
            delay = result.delay or 0.0
            when = "" if next_at is None else f" at {next_at.isoformat(timespec='seconds')}"
            return (
                f"{streak.what}: {result.error} for delivery {item.id} ({_about(item)}); "
                f"retried{when} (in {delay:.1f} s); more failures of this host are counted "
                f"in a line every {streak.EVERY:.0f} s until it answers again"
            )

        streak.noted(kind, first, "their deliveries will be retried")
