"""The composition root: builds every part from the settings, runs them in one TaskGroup, stops them
in order.

Start: take the instance lock (embedded SQLite), migrate to head, open the secret box, build the
shared HTTP clients, the token manager, the delivery worker, the pipeline, the Xelion sources (one per
stored integration) and the admin API. Stop (SIGTERM/SIGINT, reliability.md §20): stop the sources
(no new events; each logs out of Xelion), commit the events still queued in the pipeline, let the
worker finish in-flight requests for up to the grace period and return the rest to the queue, stop
the admin API, close the clients, release the lock.
Nothing else in the package knows all the parts; everything else receives what it needs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path

import httpx
import uvicorn
from fastapi import FastAPI
from sqlalchemy import text
from sqlmodel import Session

from cti_bridge.admin.app import AdminDeps, create_admin_app
from cti_bridge.admin.http import MAX_CONCURRENT, MAX_REQUEST_HEAD, AdminHttpProtocol
from cti_bridge.clock import Clock, SystemClock
from cti_bridge.config import Settings
from cti_bridge.delivery.crm_client import CrmClient
from cti_bridge.delivery.device_codes import DeviceCodePoller
from cti_bridge.delivery.egress import build_http_client
from cti_bridge.delivery.oauth import REFRESH_FAILURE_PAUSE, TokenManager
from cti_bridge.delivery.worker import DeliveryWorker
from cti_bridge.errors import ConfigError
from cti_bridge.events import CALL_EVENT_TYPES
from cti_bridge.logs import FailureStreak
from cti_bridge.metrics import Metrics
from cti_bridge.pipeline import IngestResult, Pipeline
from cti_bridge.ports import EventsNotRecorded, SourceState
from cti_bridge.retention import Retention
from cti_bridge.routing import MappingCache, RoutingCache
from cti_bridge.store import migrate
from cti_bridge.store import sources as source_store
from cti_bridge.store.app_contexts import AppContextTokenStore
from cti_bridge.store.crypto import SecretBox, SecretDecryptError, load_or_create_key_file
from cti_bridge.store.db import Database, InstanceLock, make_engine
from cti_bridge.store.tokens import UserCredentialTokenStore
from cti_bridge.store.vacuum import Vacuum
from cti_bridge.xelion.directory import HttpXelionDirectory
from cti_bridge.xelion.ownership import LocalOwnership, Ownership, PostgresOwnership
from cti_bridge.xelion.source import SourceManager, SourceOptions

log = logging.getLogger(__name__)

#: How long the stop waits for the worker's run() to end after ``worker.stop()`` (which already
#: spent the grace period): it only has to write the release of unfinished deliveries.
_WORKER_EXIT_TIMEOUT = 10.0
#: How long the stop waits at least for token refreshes in flight to commit their rotated tokens
#: once the grace period is spent (a hanging token endpoint held the exit for the whole request
#: timeout, past the grace, and a container runtime's stop timeout with it).
_REFRESH_EXIT_MIN = 1.0


def secret_key_for(settings: Settings) -> str:
    """The configured secret key, or the generated key file beside an embedded SQLite database."""
    if settings.secret_key is not None:
        return settings.secret_key.get_secret_value()
    if settings.secret_key_file:
        return load_or_create_key_file(Path(settings.secret_key_file))
    db_path = settings.sqlite_path
    if db_path is None:  # in-memory SQLite: secrets live as long as the process
        import secrets

        return secrets.token_urlsafe(48)
    return load_or_create_key_file(db_path.with_name(db_path.name + ".key"))


#: Secret columns read to check the key at start: every integration has its admin password; an
#: app context (``api/cti-app-context``) may exist without one.
_SAMPLE_SECRETS = (
    "SELECT admin_password_enc FROM xelion_context LIMIT 1",
    "SELECT COALESCE(refresh_token_enc, client_secret_enc, access_token_enc, token_extra_enc) "
    "FROM app_context WHERE COALESCE(refresh_token_enc, client_secret_enc, access_token_enc, "
    "token_extra_enc) IS NOT NULL LIMIT 1",
)


def _stored_secret(db: Database) -> str | None:
    """One secret the database holds (its ciphertext), or None when it holds none."""

    def read(session: Session) -> str | None:
        for sql in _SAMPLE_SECRETS:
            value = session.execute(text(sql)).scalar()
            if value:
                return str(value)
        return None

    return db.run_sync(read)


def _secret_box(settings: Settings, db: Database) -> SecretBox:
    """The SecretBox of the configured key, checked against a secret the database holds.

    A key that does not decrypt them (a changed ``CTI_BRIDGE_SECRET_KEY``, a lost or swapped key
    file) is an invalid setting, refused before anything starts. Found later, it was a traceback
    and exit 1 once the first source read its password, in a loop under a container runtime; and
    a lost key file beside the database was replaced by a new one first, which then had to be
    deleted for the old one to go back (an operator walkthrough's finding).
    """
    sample = _stored_secret(db)
    key_file = settings.key_file
    if sample is not None and key_file is not None and not key_file.exists():
        raise ConfigError(
            f"CTI_BRIDGE_SECRET_KEY_FILE: the key file {key_file} does not exist, but the database "
            "holds secrets encrypted with a key: put that file back (or give its key in "
            "CTI_BRIDGE_SECRET_KEY); a new key could not read them"
        )
    box = SecretBox(secret_key_for(settings))
    if sample is not None:
        try:
            box.decrypt(sample)
        except SecretDecryptError:
            where = (
                "CTI_BRIDGE_SECRET_KEY" if key_file is None else f"CTI_BRIDGE_SECRET_KEY_FILE ({key_file})"
            )
            raise ConfigError(
                f"{where}: the key does not decrypt the secrets stored in the database; give the "
                "key they were stored with"
            ) from None
    return box


#: How many events of one source may wait for their commit before ``on_event`` waits too.
MAX_UNCOMMITTED = 1000
#: How long ``api/ready`` waits for the database before it answers 503 (seconds).
READINESS_WAIT = 2.0
#: How often a source held up by a database that does not commit says so (seconds).
STALL_WARNING = 10.0


class StoreSourceHooks:
    """``ports.SourceHooks`` over the store and the pipeline."""

    def __init__(
        self,
        db: Database,
        box: SecretBox,
        pipeline: Pipeline,
        metrics: Metrics,
        *,
        max_uncommitted: int = MAX_UNCOMMITTED,
    ) -> None:
        self.db = db
        self.box = box
        self.pipeline = pipeline
        self.metrics = metrics
        self.max_uncommitted = max_uncommitted
        # Per source, the events handed over and not yet committed (oldest first: a dict keeps its
        # order), with when (monotonic) each was.
        self._uncommitted: dict[int, dict[asyncio.Future[IngestResult], float]] = {}
        self._failed: dict[int, EventsNotRecorded] = {}
        # Per source, a failure told to it since its last successful commit: the rest of that
        # failed batch (each of its events fails alike) is not told again.
        self._told: set[int] = set()
        # Told of a failed commit at once (the sources: ``SourceManager.events_not_recorded``);
        # True when a running source took it. Otherwise it waits for that source's next event.
        self.on_not_recorded: Callable[[int, EventsNotRecorded], bool] | None = None

    async def on_event(
        self, xelion_context_id: int, notification_type: str, fields: dict[str, object]
    ) -> None:
        """Hand the event to the pipeline; return without waiting for its commit (pipelining).

        Events go into the pipeline's queue in the order they are read, and the pipeline commits
        them in that order, in batches, so one transaction holds many events of a busy source. An
        event counts as received once committed (reliability.md §1), exactly as before: one still
        in this queue when the process dies is lost like one still in the socket's buffer, and
        Xelion resends neither. Memory is bounded: with more than ``max_uncommitted`` events of
        this source waiting for their commit, this waits for the oldest.

        A failed commit is logged (at ERROR, by the pipeline) and raised from this source's next
        ``on_event`` as ``EventsNotRecorded``, which says when the first event of the failed batch
        was handed over: the source then drops the socket and records a gap from that moment, so
        that the lost events fall in it, and reconnects. They are not retried here: Xelion does not
        resend, and the gap is where the operator looks for them.
        """
        failed = self._failed.pop(xelion_context_id, None)
        if failed is not None:
            raise failed
        future = self.pipeline.submit(xelion_context_id, notification_type, fields)
        waiting = self._uncommitted.setdefault(xelion_context_id, {})
        waiting[future] = time.monotonic()
        future.add_done_callback(partial(self._committed, xelion_context_id))
        while len(waiting) > self.max_uncommitted:
            await self._wait_for_commit(xelion_context_id, next(iter(waiting)), len(waiting))
            failed = self._failed.pop(xelion_context_id, None)
            if failed is not None:
                raise failed

    async def _wait_for_commit(
        self, xelion_context_id: int, oldest: asyncio.Future[IngestResult], n: int
    ) -> None:
        """Wait for ``oldest``'s commit, saying so every ``STALL_WARNING`` seconds: meanwhile the
        source reads nothing from its socket, which Xelion's pings end after about 40 s."""
        if oldest.done():
            # Committed already, but its done-callback (``_committed``, which takes it off the
            # waiting list) is still queued: let it run. Returning at once had the caller's loop
            # find the same future first again and spin for ever without yielding, the loop
            # frozen (a burst of more than max_uncommitted events with no flow control).
            await asyncio.sleep(0)
            return
        waited = 0.0
        while not oldest.done():
            done, _ = await asyncio.wait({oldest}, timeout=STALL_WARNING)
            if not done:
                waited += STALL_WARNING
                log.warning(
                    "integration %d: %d events have waited %.0f s for the database; reading from Xelion is "
                    "paused until they are committed",
                    xelion_context_id,
                    n,
                    waited,
                )

    def _committed(self, xelion_context_id: int, future: asyncio.Future[IngestResult]) -> None:
        waiting = self._uncommitted.get(xelion_context_id)
        handed_at = None if waiting is None else waiting.pop(future, None)
        if future.cancelled():
            return
        exc = future.exception()
        if exc is not None:
            first = xelion_context_id not in self._failed and xelion_context_id not in self._told
            if isinstance(exc, Exception) and first:
                # The first failed event of the batch (callbacks run in order): the gap starts here.
                ago = 0.0 if handed_at is None else time.monotonic() - handed_at
                failure = EventsNotRecorded(exc, datetime.now(UTC) - timedelta(seconds=ago))
                if self.on_not_recorded is not None and self.on_not_recorded(xelion_context_id, failure):
                    self._told.add(xelion_context_id)
                else:
                    self._failed[xelion_context_id] = failure
            return
        self._told.discard(xelion_context_id)
        result = future.result()
        self.metrics.event(result.duplicate)

    async def flush(self) -> None:
        """Wait until every event handed over so far is committed (or failed): a clean stop."""
        await self.pipeline.flush()

    async def record_unheard_failures(self) -> None:
        """After the sources stopped: the commits that failed since (the stop's last ones) have no
        source left to tell, and their events were read before the stop's gap began. Move each
        integration's open gap back to its first lost event (``gap_extended``), so that the lost
        events fall in it."""
        failed, self._failed = self._failed, {}
        for xelion_context_id, failure in failed.items():
            try:
                await self.gap_extended(xelion_context_id, failure.since, failure.gap_reason)
            except Exception as exc:
                log.error(
                    "integration %d: the gap of its lost events could not be stored (%s)",
                    xelion_context_id,
                    type(exc).__name__,
                )

    async def on_state(self, xelion_context_id: int, state: SourceState, error: str | None) -> None:
        now = datetime.now().astimezone()
        await self.db.run(lambda s: source_store.set_state(s, xelion_context_id, str(state), error, now))

    async def gap_opened(self, xelion_context_id: int, started_at: datetime, reason: str) -> None:
        await self.db.run(lambda s: source_store.open_gap(s, xelion_context_id, started_at, reason))

    async def gap_closed(self, xelion_context_id: int, ended_at: datetime) -> None:
        await self.db.run(lambda s: source_store.close_gap(s, xelion_context_id, ended_at))

    async def gap_extended(self, xelion_context_id: int, started_at: datetime, reason: str) -> None:
        await self.db.run(lambda s: source_store.extend_open_gap(s, xelion_context_id, started_at, reason))

    async def heartbeat(self, xelion_context_id: int, at: datetime) -> None:
        await self.db.run(lambda s: source_store.heartbeat(s, xelion_context_id, at))

    async def load_state(self, xelion_context_id: int) -> tuple[str | None, datetime | None]:
        return await self.db.run(lambda s: source_store.load_state(s, xelion_context_id))

    async def load_session_token(self, xelion_context_id: int) -> str | None:
        return await self.db.run(lambda s: source_store.load_session_token(s, self.box, xelion_context_id))

    async def save_session_token(self, xelion_context_id: int, token: str | None) -> None:
        await self.db.run(lambda s: source_store.save_session_token(s, self.box, xelion_context_id, token))


class DaemonSupervisor:
    """``ports.Supervisor``: applies configuration changes from the admin API to the running parts."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self.daemon.background.add(task)
        task.add_done_callback(self.daemon.background.discard)
        task.add_done_callback(_log_failure)

    def integration_changed(self, xelion_context_id: int, *, retry_failed: bool = False) -> None:
        self.daemon.routing.invalidate(xelion_context_id)
        self._spawn(self.daemon.apply_integration(xelion_context_id, retry_failed=retry_failed))

    def integration_deleted(self, xelion_context_id: int) -> None:
        self.daemon.routing.invalidate(xelion_context_id)
        # Its credentials are gone, and SQLite gives a deleted row's id to the next one: a token
        # cached for a deleted credential was handed to the new credential of that id, another
        # integration's user (a security review's finding). Deleting is rare; the next delivery of
        # each user reads its stored token again.
        self.daemon.tokens.forget_all()
        self._spawn(self.daemon.remove_integration(xelion_context_id))

    def credentials_deleted(self, credential_id: int) -> None:
        self.daemon.routing.invalidate()
        # SQLite gives the id to the next credential: nothing of this one may reach that one.
        self.daemon.tokens.forget(credential_id)

    def credentials_changed(self, credential_id: int) -> None:
        self.daemon.routing.invalidate()
        self.daemon.tokens.invalidate(credential_id)
        # The repair's own transaction resumed the parked deliveries (store.integrations
        # update_secret): the worker only needs to know there is work to claim.
        self.daemon.worker.wake()


def _log_failure(task: asyncio.Future[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("a configuration change could not be applied", exc_info=task.exception())


@dataclass
class Daemon:
    """Every running part of cti-bridge, built by ``build``."""

    settings: Settings
    db: Database
    box: SecretBox
    clock: Clock
    crm_http: httpx.AsyncClient
    xelion_http: httpx.AsyncClient
    routing: RoutingCache
    metrics: Metrics
    tokens: TokenManager[int]
    app_tokens: TokenManager[int]
    worker: DeliveryWorker
    pipeline: Pipeline
    sources: SourceManager
    retention: Retention
    lock: InstanceLock | None
    vacuum: Vacuum | None = None
    device_codes: DeviceCodePoller | None = None
    ownership: Ownership = field(default_factory=LocalOwnership)
    source_hooks: StoreSourceHooks | None = None
    background: set[asyncio.Future[None]] = field(default_factory=set)
    admin_app: FastAPI | None = None
    # Serialises reading an integration's configuration and applying it to its source: the admin
    # API's changes (supervisor) and the replicas' follow pass.
    config_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # Per integration, the event types of its mappings that are not call events (last warned of).
    _unsupported: dict[int, frozenset[str]] = field(default_factory=dict)

    async def apply_integration(self, xelion_context_id: int, *, retry_failed: bool = False) -> None:
        """Bring the integration's source in line with the stored configuration (read and applied
        under ``config_lock``, so an older read cannot be applied after a newer one).
        ``retry_failed``: an operator changed where or how it logs in, and a source that gave up
        starts again (see ``SourceManager.update``); the replicas' periodic pass does not, or a
        refused login would be tried again every poll."""
        async with self.config_lock:
            await self._apply_locked(xelion_context_id, retry_failed=retry_failed)

    async def remove_integration(self, xelion_context_id: int) -> None:
        """Stop a deleted integration's source (under ``config_lock``)."""
        async with self.config_lock:
            await self.sources.stop(xelion_context_id)

    async def start_sources(self) -> None:
        """Apply every stored integration to the sources, and stop those no longer stored: one
        pass under ``config_lock``, so an integration created meanwhile through this replica's own
        API is either in the pass's list or started after it, never stopped by it."""
        async with self.config_lock:
            ids = await self.db.run(source_store.all_context_ids)
            for ctx_id in ids:
                await self._apply_locked(ctx_id)
            for ctx_id in self.sources.running() - set(ids):
                await self.sources.stop(ctx_id)

    async def _apply_locked(self, xelion_context_id: int, *, retry_failed: bool = False) -> None:
        config = await self.db.run(lambda s: source_store.load_source_config(s, self.box, xelion_context_id))
        if config is None:
            self._unsupported.pop(xelion_context_id, None)
            await self.sources.stop(xelion_context_id)
        else:
            self._warn_unsupported(xelion_context_id, config.event_types)
            await self.sources.update(config, retry_failed=retry_failed)

    def _warn_unsupported(self, xelion_context_id: int, event_types: frozenset[str]) -> None:
        """Say once (per change) that an integration has mappings for types that are not call events.
        The admin API refuses such a mapping now; one stored by an earlier version is still
        subscribed (xelion-protocol.md §3.2) but its events are never delivered."""
        unsupported = event_types - CALL_EVENT_TYPES
        if unsupported == self._unsupported.get(xelion_context_id, frozenset()):
            return
        self._unsupported[xelion_context_id] = unsupported
        if unsupported:
            log.warning(
                "integration %d has mappings for %s, which are not call events: nothing is delivered "
                "for them; change or remove those mappings (PUT .../event-uri-mappings)",
                xelion_context_id,
                ", ".join(sorted(unsupported)),
            )

    async def follow_integrations(self, stop: asyncio.Event) -> None:
        """PostgreSQL replicas: every ``replica_poll_seconds``, apply what another replica's admin
        API changed (an integration created, deleted, or with new credentials or event types), which
        only that replica's supervisor heard of. An unchanged integration costs a read, no reconnect.
        Cached access tokens whose credential changed are dropped (``follow_credentials``).

        Cancellation: ends the loop; a change being applied finishes in the source manager.
        """
        every = self.settings.replica_poll_seconds
        integrations = FailureStreak(
            log, "reading the integrations for other replicas' changes", level=logging.WARNING
        )
        credentials = FailureStreak(
            log, "reading the credentials for other replicas' changes", level=logging.WARNING
        )
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), every)
            if stop.is_set():
                return
            try:
                await self.start_sources()
                integrations.recovered()
            except Exception as exc:
                integrations.failed(exc)
            try:  # apart: one integration that cannot be applied must not keep stale tokens cached
                await self.follow_credentials()
                credentials.recovered()
            except Exception as exc:
                credentials.failed(exc)

    async def follow_credentials(self) -> None:
        """Forget the cached access tokens of credentials that another replica's admin API changed
        (a new refresh token or device code, a deleted user): one read of each kind's versions."""
        for manager, kind in ((self.tokens, "user"), (self.app_tokens, "app context")):
            for key in await manager.drop_changed():
                log.info("%s %s changed in the database: its cached access token is dropped", kind, key)

    async def readiness(self) -> tuple[bool, dict[str, object]]:
        """Ready when the database answers and every STORED integration's source is subscribed: an
        integration created a moment ago whose source has not started yet is not ready."""
        try:
            # Bounded: on a locked or silent database the probe hung instead of answering 503.
            ids = await asyncio.wait_for(self.db.run(source_store.all_context_ids), READINESS_WAIT)
            db_ok = True
        except Exception as exc:
            log.warning("readiness: the database does not answer (%s)", type(exc).__name__)
            ids, db_ok = [], False
        live = self.sources.statuses()
        if not db_ok:
            # The stored integrations are unknown; the running sources still say what they do
            # (answered as "sources": {}, the operator lost the one detail the database's
            # absence leaves: an operations review's finding).
            ids = sorted(live)
        statuses = {str(i): str(live[i].state) if i in live else str(SourceState.STOPPED) for i in ids}
        # A replica standing by for another's websocket does its other work (API, deliveries).
        ok = db_ok and all(s in (SourceState.SUBSCRIBED, SourceState.STANDBY) for s in statuses.values())
        return ok, {"database": "ok" if db_ok else "unavailable", "sources": statuses}

    def source_metrics(self) -> dict[int, tuple[str, int]]:
        # A standby's figures are the owner's: the stored state (metrics.py reads it), not "standby".
        return {
            k: (str(v.state), v.reconnects)
            for k, v in self.sources.statuses().items()
            if v.state is not SourceState.STANDBY
        }

    async def close(self, refresh_wait: float | None = None) -> None:
        """Close every client and the database. Refreshes in flight may commit their rotated tokens
        first, for up to ``refresh_wait`` seconds (None: the grace period). One cut short ends as a
        ``kill -9`` in mid-refresh does: the old refresh token still usable, or, if the provider
        rotated it meanwhile, the credential marked for re-authorisation (reliability.md §11)."""
        wait = self.settings.shutdown_grace_seconds if refresh_wait is None else refresh_wait
        for manager in (self.tokens, self.app_tokens):
            try:
                await asyncio.wait_for(manager.aclose(), max(_REFRESH_EXIT_MIN, wait))
            except TimeoutError:
                log.warning("stopping without waiting longer for a token refresh in flight")
        await self.crm_http.aclose()
        await self.worker.crm.aclose()
        await self.xelion_http.aclose()
        await self.ownership.aclose()
        self.db.dispose(wait=False)
        if self.lock is not None:
            self.lock.release()


def build(settings: Settings, *, clock: Clock | None = None) -> Daemon:
    """Build every part (synchronously: lock, migrate, keys). Raises StoreLockedError, ConfigError."""
    clock = clock or SystemClock()
    lock: InstanceLock | None = None
    if settings.sqlite_path is not None:
        lock = InstanceLock(settings.sqlite_path.resolve())
        lock.acquire()
    try:
        engine = make_engine(settings.database_url)
        migrate.upgrade(engine)
        db = Database(settings.database_url, engine=engine)
        box = _secret_box(settings, db)
        # The worker's CrmClient: CRM requests over its own keep-alive pool (delivery/http1.py), token
        # refreshes (httpx) over the aiohttp session it holds.
        crm_client = CrmClient(settings)
        crm_http = build_http_client(settings, crm_client.session)
        xelion_http = httpx.AsyncClient(
            timeout=httpx.Timeout(settings.xelion_request_timeout, connect=settings.connect_timeout),
            follow_redirects=False,
        )
        mappings = MappingCache()
        routing = RoutingCache(mappings)
        metrics_holder: list[Daemon] = []
        metrics = Metrics(db, sources=lambda: metrics_holder[0].source_metrics() if metrics_holder else {})
        tokens = TokenManager(
            UserCredentialTokenStore(db, box),
            crm_http,
            clock=clock,
            margin_seconds=settings.token_refresh_margin_seconds,
            allow_private=settings.allow_private_targets,
            on_refresh=lambda result: metrics.refreshes.labels(result).inc(),
            failure_pause=REFRESH_FAILURE_PAUSE,
        )
        # One token manager implementation, two kinds of credential: CRM users and app contexts.
        app_tokens = TokenManager(
            AppContextTokenStore(db, box),
            crm_http,
            clock=clock,
            margin_seconds=settings.token_refresh_margin_seconds,
            allow_private=settings.allow_private_targets,
            on_refresh=lambda result: metrics.refreshes.labels(result).inc(),
        )
        worker = DeliveryWorker(
            db=db,
            mappings=mappings,
            tokens=tokens,
            crm=crm_client,
            settings=settings,
            metrics=metrics,
            clock=clock,
            sole_owner=lock is not None,
        )
        # The worker is woken by the pipeline's hand-off (``accept``) only when it left work pending.
        pipeline = Pipeline(db, routing, clock=clock, handoff=worker)
        hooks = StoreSourceHooks(db, box, pipeline, metrics)
        ownership: Ownership = (
            LocalOwnership()
            if db.is_sqlite
            else PostgresOwnership(
                settings.database_url,
                poll_seconds=settings.replica_poll_seconds,
                connect_timeout=settings.connect_timeout,
                clock=clock,
            )
        )
        sources = SourceManager(
            hooks,
            xelion_http,
            SourceOptions(
                ping_interval=settings.xelion_ping_interval,
                ping_timeout=settings.xelion_ping_timeout,
                backoff_min=settings.xelion_backoff_min,
                backoff_max=settings.xelion_backoff_max,
                healthy_after=settings.xelion_healthy_after,
                heartbeat_interval=settings.source_heartbeat_seconds or None,
                app_key=settings.xelion_app_key,
                # As the REST client (httpx, trust_env): HTTPS_PROXY/HTTP_PROXY/NO_PROXY. Direct,
                # the websocket failed on every try where only the proxy reaches Xelion, while
                # the logins went through.
                proxy=True,
            ),
            ownership,
        )
        daemon = Daemon(
            settings=settings,
            db=db,
            box=box,
            clock=clock,
            crm_http=crm_http,
            xelion_http=xelion_http,
            routing=routing,
            metrics=metrics,
            tokens=tokens,
            app_tokens=app_tokens,
            worker=worker,
            pipeline=pipeline,
            sources=sources,
            retention=Retention(db, settings, clock, metrics),
            lock=lock,
            vacuum=Vacuum(db, settings),
            device_codes=DeviceCodePoller(
                db, tokens, owned=lambda x: sources.status(x).state is not SourceState.STANDBY
            ),
            ownership=ownership,
            source_hooks=hooks,
        )
        # A failed commit reaches its source at once (it drops the socket: the gap starts then).
        hooks.on_not_recorded = sources.events_not_recorded
        metrics_holder.append(daemon)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    from cti_bridge.admin.routes.deliveries import router as deliveries_router
    from cti_bridge.admin.routes.ops import ops_router
    from cti_bridge.admin.routes.preview import router as preview_router

    daemon.admin_app = create_admin_app(
        AdminDeps(
            settings=settings,
            database=db,
            secret_box=box,
            directory=HttpXelionDirectory(xelion_http),
            supervisor=DaemonSupervisor(daemon),
            clock=clock,
            readiness=daemon.readiness,
            extra_routers=[deliveries_router, preview_router, ops_router],
            app_tokens=app_tokens,
            external_http=crm_http,
        )
    )
    # What the lead's routes need beyond AdminDeps (deliveries, metrics): on the app's state.
    daemon.admin_app.state.metrics = metrics
    daemon.admin_app.state.worker = worker
    return daemon


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: the daemon owns SIGTERM/SIGINT and stops in order."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def serve(
    daemon: Daemon, stop: asyncio.Event, *, on_started: Callable[[int], None] | None = None
) -> None:
    """Run the daemon until ``stop`` is set, then stop every part in order."""
    settings = daemon.settings
    assert daemon.admin_app is not None
    config = uvicorn.Config(
        daemon.admin_app,
        host=settings.admin_host,
        port=settings.admin_port,
        log_config=None,
        access_log=False,
        lifespan="off",
        # The client address is the socket's peer: with uvicorn's default, a client reaching the
        # port from 127.0.0.1 (a local proxy or tunnel passing headers on) chose its own address in
        # X-Forwarded-For and was never locked out by the login limiter (a security review's
        # finding).
        proxy_headers=False,
        # Bounds for a port that may face a network (admin/http.py).
        http=AdminHttpProtocol,
        h11_max_incomplete_event_size=MAX_REQUEST_HEAD,
        limit_concurrency=MAX_CONCURRENT,
    )
    server = _Server(config)
    loop = asyncio.get_running_loop()
    grace_ends: float | None = None
    try:
        # Bound before anything starts: a port in use ended the start in uvicorn's sys.exit, with
        # the sources already running and a traceback for the operator to read.
        sock = _admin_socket(settings.admin_host, settings.admin_port)
        async with asyncio.TaskGroup() as tg:
            server_task = tg.create_task(server.serve(sockets=[sock]), name="admin-api")
            worker_task = tg.create_task(daemon.worker.run(), name="delivery-worker")
            await daemon.start_sources()
            while not server.started:
                if server_task.done():
                    break
                await asyncio.sleep(0.02)
            if server.started and on_started is not None:
                port = (
                    server.servers[0].sockets[0].getsockname()[1] if server.servers else settings.admin_port
                )
                on_started(int(port))
            log.info("cti-bridge is running; admin API on %s:%s", settings.admin_host, settings.admin_port)
            if _unconfigurable(settings):
                log.warning(
                    "no integration can be created: CTI_BRIDGE_ADMIN_TOKEN is not set (or empty) and "
                    "CTI_BRIDGE_ALLOWED_XELION_HOSTS is empty; set one of them"
                )
            stop_task = tg.create_task(stop.wait(), name="stop-signal")
            retention_task = tg.create_task(daemon.retention.run(stop), name="retention")
            vacuum_task = tg.create_task(daemon.vacuum.run(stop), name="vacuum") if daemon.vacuum else None
            devices_task = (
                tg.create_task(daemon.device_codes.run(stop), name="device-codes")
                if daemon.device_codes
                else None
            )
            follow_task = (
                None
                if daemon.db.is_sqlite
                else tg.create_task(daemon.follow_integrations(stop), name="follow-integrations")
            )
            await asyncio.wait({stop_task, server_task, worker_task}, return_when=asyncio.FIRST_COMPLETED)
            grace_ends = loop.time() + settings.shutdown_grace_seconds
            log.info(
                "stopping: sources first, then the worker (grace %.0f s)", settings.shutdown_grace_seconds
            )
            if follow_task is not None:
                follow_task.cancel()  # it must not start a source that stop_all has just stopped
            if devices_task is not None:
                devices_task.cancel()  # no new token request while stopping
            # Each step is bounded by the grace: with a database that does not answer (a lock held
            # by another program, a silent server) the sources' gap writes and the last commits
            # waited for it, and the stop with them (65 s on a locked SQLite file; for ever on a
            # PostgreSQL that accepts and never answers).
            await _within(daemon.sources.stop_all(), settings.shutdown_grace_seconds, "stopping the sources")
            # Every event received is committed (and its fresh deliveries handed over) before the
            # worker stops taking work: SIGTERM loses nothing that was read from a socket.
            await _within(daemon.pipeline.flush(), settings.shutdown_grace_seconds, "the last commits")
            if daemon.source_hooks is not None:
                # Those of the last commits that failed: their events in the stop's gap.
                await _within(
                    daemon.source_hooks.record_unheard_failures(),
                    settings.shutdown_grace_seconds,
                    "recording the gaps of lost events",
                )
            # The grace for the requests in flight, then the writes of their outcomes and of the
            # release of the rest, which a database that does not answer would hold.
            stopped = await _within(
                daemon.worker.stop(),
                settings.shutdown_grace_seconds + _WORKER_EXIT_TIMEOUT,
                "recording the last outcomes",
            )
            # The worker's run() returns once its loop has ended and the deliveries it did not finish
            # are back in the queue. Cancelling it before then would interrupt that release and
            # leave them leased ('sending') until the next start or lease expiry: wait (bounded).
            await asyncio.wait({worker_task}, timeout=_WORKER_EXIT_TIMEOUT if stopped else 1.0)
            worker_task.cancel()
            # A batch already in the database thread still commits (Database.run); the next does not start.
            retention_task.cancel()
            if vacuum_task is not None:
                vacuum_task.cancel()  # ``stop`` is not set when the API or the worker ended first
            server.should_exit = True
            stop_task.cancel()
    finally:
        for task in list(daemon.background):
            task.cancel()
        await daemon.close(None if grace_ends is None else grace_ends - loop.time())


def _unconfigurable(settings: Settings) -> bool:
    """Whether no one can create an integration: every POST api/crm-integrations is then a 403 (no
    operator token, and no Xelion host a session-less request may add)."""
    token = settings.admin_token.get_secret_value() if settings.admin_token is not None else ""
    return not token and not settings.allowed_xelion_hosts


def _admin_socket(host: str, port: int) -> socket.socket:
    """The admin API's listening socket (as uvicorn would bind it), or ``ConfigError`` naming the
    settings and the system's reason."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        reason = exc.strerror or type(exc).__name__
        raise ConfigError(
            f"admin_host/admin_port: cannot listen on {host}:{port} ({reason}); "
            "set CTI_BRIDGE_ADMIN_HOST or CTI_BRIDGE_ADMIN_PORT"
        ) from None
    sock.set_inheritable(True)
    return sock


async def _within(step: Awaitable[None], seconds: float, what: str) -> bool:
    """Await one step of the stop for at most ``seconds`` (it is cancelled after that); whether it
    finished."""
    try:
        await asyncio.wait_for(step, max(seconds, 1.0))
    except TimeoutError:
        log.warning("stopping: %s did not finish within %.0f s (the database?); going on", what, seconds)
        return False
    return True


def install_signal_handlers(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
