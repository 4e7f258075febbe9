"""The Xelion notification websocket source: one per integration, and the manager that runs them.

A :class:`XelionSource` logs in as the integration's admin (userSpace ``cti-bridge-<id>``), fetches a
one-time websocket URL, connects, subscribes, and hands every call event to
``SourceHooks.on_event`` — awaiting it, because that commits the event to the database; it never waits
on a CRM (DESIGN.md §1). After any close it fetches a fresh URL and reconnects with jittered
exponential backoff that resets only after a connection stayed healthy (xelion-protocol.md §3.6,
reliability.md §16-§18). Wrong admin credentials (10004) stop the loop and show as ``FAILED``; a
disabled admin account (10006) shows as ``FAILED`` too, and is tried again every few minutes
(``SourceOptions.disabled_retry``). Every period without a live, subscribed socket is reported as a
gap.

:class:`SourceManager` owns one asyncio task per integration and is what the application's
supervisor drives (start, stop, update, stop_all on SIGTERM, reliability.md §20).

Secrets: the admin password, the session tokens and the websocket URL (whose path is a credential,
§3.1) never reach a log line or a state/gap reason; the websockets library's debug logging, which
prints the request path, is switched off for our connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import httpx
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI
from websockets.frames import CloseCode
from websockets.protocol import State

from cti_bridge.clock import Clock, SystemClock
from cti_bridge.events import CALL_EVENT_TYPES, normalise_fields, parse_notification
from cti_bridge.ports import EventsNotRecorded, SourceConfig, SourceHooks, SourceState
from cti_bridge.xelion.ownership import Held, LocalOwnership, Ownership
from cti_bridge.xelion.rest import XelionError, XelionSession

logger = logging.getLogger(__name__)

SOURCE_USER_SPACE_PREFIX = "cti-bridge-"
#: The reason of the gap a source opens when it stops (a daemon stopping, an integration restarted).
STOPPED_REASON = "cti-bridge stopped listening"


class _QuietLogger(logging.LoggerAdapter):  # type: ignore[type-arg]
    """A logger for the websockets library that never reports DEBUG as enabled.

    websockets logs the handshake request line (which carries the one-time secret of §3.1) and every
    frame at DEBUG; it checks ``isEnabledFor(DEBUG)`` once per connection, so this keeps them out.
    """

    def isEnabledFor(self, level: int) -> bool:
        return level > logging.DEBUG and self.logger.isEnabledFor(level)


@dataclass(frozen=True)
class SourceOptions:
    """Timing and injectables of the sources; the defaults are the protocol's (§3.3, §3.6).

    ``random`` returns a float in [0, 1) and ``sleep`` is awaited for every backoff delay, so tests can
    make the backoff deterministic or fast. ``backoff_min``/``backoff_max`` bound the delay before the
    jitter; ``healthy_after`` is how long a connection must stay up before the backoff resets.
    """

    ping_interval: float | None = 20.0
    ping_timeout: float | None = 20.0
    close_timeout: float = 5.0
    open_timeout: float = 10.0
    backoff_min: float = 1.0
    backoff_max: float = 60.0
    healthy_after: float = 30.0
    #: How often a subscribed source stores that it listens (``SourceHooks.heartbeat``; None: never).
    heartbeat_interval: float | None = 30.0
    logout_timeout: float = 5.0
    renew_retry_delay: float = 5.0
    #: How often a source whose admin account Xelion says is disabled (10006) tries again.
    disabled_retry: float = 300.0
    app_key: str | None = None
    #: Proxy for the websocket (``None``: connect directly; ``True``: from the environment).
    proxy: str | Literal[True] | None = None
    random: Callable[[], float] = random.random
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
    clock: Clock = field(default_factory=SystemClock)

    def backoff_delay(self, attempt: int) -> float:
        """The delay before reconnect ``attempt`` (0-based): between half and all of
        ``min(backoff_max, backoff_min * 2**attempt)`` ("equal jitter"), so a storm of reconnects
        spreads out but never comes faster than half the exponential schedule."""
        base = min(self.backoff_max, self.backoff_min * (2.0 ** min(attempt, 30)))
        return base * (0.5 + 0.5 * self.random())


@dataclass(frozen=True)
class SourceStatus:
    """What health, metrics and the admin API show about one source."""

    state: SourceState
    since: datetime | None = None
    last_event_at: datetime | None = None
    last_error: str | None = None
    reconnects: int = 0
    connected_since: datetime | None = None


def subscription_frame(event_types: Iterable[str], toggle: bool = True) -> str:
    """The one ``multiNotificationRequest`` sent after every (re)connect (§3.2)."""
    return json.dumps(
        {
            "messageType": "multiNotificationRequest",
            "notifications": [
                {"notificationType": event_type, "toggle": toggle} for event_type in sorted(event_types)
            ],
        }
    )


def _is_echo(message: str | bytes, probe: dict[str, str]) -> bool:
    """Whether a frame is the echo of our probe (compared as JSON: whitespace may differ)."""
    if isinstance(message, bytes) or '"test"' not in message:
        return False
    try:
        return bool(json.loads(message) == probe)
    except ValueError:
        return False


class _NoEcho(Exception):
    """The server did not echo the subscription probe within ``open_timeout``."""


class _HookFailed(Exception):
    """``on_event`` raised: the event was not recorded, so the socket is dropped and a gap opened
    from ``since``, the moment the first unrecorded event was read."""

    def __init__(self, reason: str, since: datetime) -> None:
        super().__init__(reason)
        self.since = since


class XelionSource:
    """The websocket source of one integration (xelion-protocol.md §3).

    Run it with :meth:`run` (the manager does, in its own task). It returns only when the source
    failed for good (wrong credentials: state ``FAILED``); otherwise it runs until cancelled or
    :meth:`stop` is awaited, then closes the socket, logs out and reports ``STOPPED``.
    """

    def __init__(
        self,
        config: SourceConfig,
        hooks: SourceHooks,
        client: httpx.AsyncClient,
        options: SourceOptions | None = None,
    ) -> None:
        self.config = config
        self._hooks = hooks
        self._client = client
        self._options = options or SourceOptions()
        self._clock = self._options.clock
        self._id = config.xelion_context_id
        self._event_types: frozenset[str] = frozenset(config.event_types)
        self._state = SourceState.STOPPED
        self._since: datetime | None = None
        self._last_event_at: datetime | None = None
        self._last_error: str | None = None
        self._reconnects = 0
        self._connected_since: datetime | None = None
        self._gap_open = False
        self._gap_started: tuple[datetime, float] = (datetime.min.replace(tzinfo=UTC), 0.0)
        self._ws: ClientConnection | None = None
        self._session: XelionSession | None = None
        self._renewer: asyncio.Task[None] | None = None
        self._task: asyncio.Task[Any] | None = None
        self._connected_at: float | None = None  # monotonic time of the last subscription
        # When this connection's events stopped being read or recorded, if before it was noticed
        # closed: the start of its gap (None: when it is noticed).
        self._unread_since: datetime | None = None
        # When a stop (cancellation) ended the reading of a live socket (``_shutdown``'s gap start).
        self._reading_stopped_at: datetime | None = None
        # When a frame was last read from the socket (monotonic): _silent_since.
        self._heard_at = 0.0
        # Events handed over whose commit failed, told by the hooks at once (``not_recorded``).
        self._not_recorded: EventsNotRecorded | None = None
        self._closing: set[asyncio.Task[Any]] = set()
        self._probes = 0
        self._where = f"{config.target.host}/{config.target.tenant}"

    # -- what others read -------------------------------------------------------------------------

    @property
    def state(self) -> SourceState:
        return self._state

    @property
    def event_types(self) -> frozenset[str]:
        return self._event_types

    def status(self) -> SourceStatus:
        return SourceStatus(
            state=self._state,
            since=self._since,
            last_event_at=self._last_event_at,
            last_error=self._last_error,
            reconnects=self._reconnects,
            connected_since=self._connected_since,
        )

    # -- control ----------------------------------------------------------------------------------

    async def run(self) -> None:
        """Connect, subscribe and forward events until stopped, cancelled or failed.

        Cancellation: the socket is closed, a gap opened (unless one is open already), the session
        logged out (bounded by ``logout_timeout``), ``STOPPED`` reported, and the ``CancelledError``
        re-raised. The gap stays open: nothing listens until the next start (of this process or any
        other) subscribes again and closes it, so the time the daemon was down is a gap too
        (reliability.md §18).
        """
        self._task = asyncio.current_task()
        try:
            await self._run()
        finally:
            await self._shutdown()

    async def stop(self) -> None:
        """Stop :meth:`run` (cancel its task) and wait until it has logged out.

        Cancellation: cancelling the caller does not interrupt the source's own shutdown.
        """
        task = self._task
        if task is None or task.done():
            return
        if task is asyncio.current_task():
            raise RuntimeError("stop() called from the source's own task; cancel it instead")
        task.cancel()
        await asyncio.wait([task])

    async def set_event_types(self, event_types: frozenset[str]) -> None:
        """Change the subscribed types; re-subscribes on the live socket at once (§3.2).

        Types dropped are switched off with one ``notificationRequest`` each (toggle false); the
        new full list is sent as one ``multiNotificationRequest``. Without a live socket the new list
        simply applies to the next subscription. Cancellation: the frames sent so far stay sent.
        """
        removed = self._event_types - event_types
        self._event_types = frozenset(event_types)
        ws = self._ws
        if ws is None or self._state is not SourceState.SUBSCRIBED:
            return
        try:
            for event_type in sorted(removed):
                await ws.send(
                    json.dumps(
                        {
                            "messageType": "notificationRequest",
                            "notificationType": event_type,
                            "toggle": False,
                        }
                    )
                )
            await ws.send(subscription_frame(self._event_types))
            logger.info("re-subscribed to Xelion at %s (%d event types)", self._where, len(self._event_types))
        except ConnectionClosed:
            pass  # the read loop notices and the next subscription carries the new list

    # -- the loop ---------------------------------------------------------------------------------

    async def _run(self) -> None:
        options = self._options
        stored = await self._call_hook("load_session_token", self._hooks.load_session_token(self._id))
        self._session = XelionSession(
            self._client,
            self.config.target,
            self.config.admin_username,
            self.config.admin_password,
            f"{SOURCE_USER_SPACE_PREFIX}{self._id}",
            app_key=options.app_key,
            stored_token=stored if isinstance(stored, str) and stored else None,
            on_token=self._save_token,
            clock=self._clock,
        )
        await self._open_gap("starting")
        attempt = 0
        while True:
            await self._set_state(SourceState.CONNECTING, self._last_error)
            self._connected_at = None
            self._unread_since = None
            disabled = False
            try:
                await self._connect_once()
                reason = "Xelion closed the websocket"
            except XelionError as exc:
                if exc.permanent and exc.kind != "disabled":
                    # §3.6: bad credentials stop the retries until the credentials change.
                    logger.error(
                        "Xelion at %s refused the admin login (%s); giving up", self._where, exc.kind
                    )
                    self._last_error = exc.message
                    await self._set_state(SourceState.FAILED, exc.message)
                    return
                # A disabled account (10006) is not stopped for: a Xelion admin who enables it
                # again need not know that cti-bridge waits for it. Shown as failed meanwhile,
                # and tried again slowly (a login attempt a few minutes apart).
                disabled = exc.kind == "disabled"
                reason = exc.message
            except ConnectionClosed as exc:
                code = exc.rcvd.code if exc.rcvd is not None else (exc.sent.code if exc.sent else 1006)
                reason = f"websocket closed ({code})"
                # Nothing was read after the close: the gap starts at the close, not after the
                # hooks below have run.
                self._unread_from(self._clock.now())
                if exc.rcvd is None:
                    self._unread_from(self._silent_since())
            except InvalidStatus as exc:
                reason = f"websocket refused: HTTP {exc.response.status_code}"
            except (InvalidURI, InvalidHandshake) as exc:
                reason = f"websocket handshake failed: {type(exc).__name__}"
            except (OSError, TimeoutError) as exc:
                reason = f"websocket connection failed: {type(exc).__name__}"
            except _NoEcho:
                reason = "websocket did not answer the subscription probe"
            except _HookFailed as exc:
                reason = f"an event could not be recorded: {exc}"
                self._unread_from(exc.since)
            except Exception as exc:
                # A bug must not end the integration's only listener: log it, back off, try again.
                logger.exception("unexpected error in the source of Xelion at %s", self._where)
                reason = f"unexpected error: {type(exc).__name__}"
            finally:
                self._ws = None
                self._connected_since = None
            lost = self._not_recorded
            if lost is not None:
                # The socket was dropped for it (``not_recorded``): that is what ended it.
                self._not_recorded = None
                reason = lost.gap_reason
                self._unread_from(lost.since)
            connected_at = self._connected_at
            self._last_error = reason
            await self._open_gap(reason, self._unread_since)
            if connected_at is not None and self._clock.monotonic() - connected_at >= options.healthy_after:
                attempt = 0  # §3.6: reset only after a connection stayed up long enough
            if disabled:
                logger.error(
                    "Xelion at %s: the admin account is disabled; trying again in %.0f s",
                    self._where,
                    options.disabled_retry,
                )
                # The session's renewer would meet the same 10006 at every renew and log in again
                # every renew_retry_delay (5 s) meanwhile: the next login starts a new one.
                await self._stop_renewer()
                await self._set_state(SourceState.FAILED, reason)
                await options.sleep(options.disabled_retry)
                continue
            delay = options.backoff_delay(attempt)
            attempt += 1
            self._reconnects += 1
            logger.warning(
                "Xelion at %s websocket down (%s); reconnecting in %.1f s", self._where, reason, delay
            )
            await self._set_state(SourceState.BACKOFF, reason)
            await options.sleep(delay)

    async def _connect_once(self) -> None:
        """Log in if needed, fetch a fresh URL, connect, subscribe, read until the socket closes.

        Sets ``_connected_at`` (monotonic) once subscribed, which decides the backoff reset.
        """
        session = self._session
        assert session is not None
        options = self._options
        if not session.logged_in:
            await session.login()
        if self._renewer is None or self._renewer.done():
            self._renewer = asyncio.create_task(
                session.keep_alive(options.renew_retry_delay), name=f"xelion-renew-{self._id}"
            )
        url = await session.websocket_url()  # a 401 logs in again inside (§3.6)
        async with connect(
            url,
            ping_interval=options.ping_interval,
            ping_timeout=options.ping_timeout,
            close_timeout=options.close_timeout,
            open_timeout=options.open_timeout,
            proxy=options.proxy,
            logger=_QuietLogger(logging.getLogger("cti_bridge.xelion.websocket"), {}),
            compression=None,
        ) as ws:
            self._ws = ws
            await ws.send(subscription_frame(self._event_types))
            # §3.2 has no acknowledgement, but §3.3 echoes "test" frames in order: the echo of a
            # probe sent after the subscription proves the server read it. Only then is the socket
            # "subscribed" (and the gap closed), so a server that accepts and closes at once is one
            # long gap, not a flicker of tiny ones.
            self._probes += 1
            probe = {"messageType": "test", "probe": f"cti-bridge-{self._id}-{self._probes}"}
            await ws.send(json.dumps(probe))
            confirmed = False
            beating: asyncio.Task[None] | None = None
            clock = self._clock
            self._heard_at = clock.monotonic()
            try:
                async with asyncio.timeout(options.open_timeout) as deadline:
                    async for message in ws:
                        self._heard_at = clock.monotonic()  # see _silent_since
                        if not confirmed and _is_echo(message, probe):
                            confirmed = True
                            deadline.reschedule(None)
                            await self._subscribed()
                            if options.heartbeat_interval:
                                beating = asyncio.create_task(
                                    self._beat(options.heartbeat_interval),
                                    name=f"xelion-heartbeat-{self._id}",
                                )
                            continue
                        await self._handle(message)  # events may come before the echo
            except TimeoutError:
                if confirmed:
                    raise
                raise _NoEcho() from None
            except asyncio.CancelledError:
                # Stopped: nothing is read from now on, though the close handshake (up to the close
                # timeout) and the logout come first. The stop's gap starts here.
                self._reading_stopped_at = clock.now()
                # A stop is not a failure: "going away" (1001), as RFC 6455 says for a client that
                # leaves. ``connect``'s exit with the cancellation would close with 1011 (internal
                # error), which the Xelion server logs as a client fault at every clean stop.
                with contextlib.suppress(Exception):
                    await ws.close(CloseCode.GOING_AWAY, "cti-bridge is stopping")
                raise
            finally:
                if beating is not None:
                    beating.cancel()  # before the gap opens: no heartbeat claims a later listen

    def not_recorded(self, failure: EventsNotRecorded) -> bool:
        """Events this source handed over could not be committed (the hooks say so the moment the
        commit fails): drop the socket now, so that the gap starts where they were handed over
        and ends when it listens again, instead of at the next event, which on a quiet line may
        come hours later, or never before a stop. Not listening (the gap is open already): that gap
        is moved back to the failure (``SourceHooks.gap_extended``). Whether it could act: not
        while it is starting or stopping (no socket and no gap open), when the caller keeps the
        failure for the source's next event.
        """
        ws = self._ws
        if ws is not None:
            if self._not_recorded is not None and self._not_recorded.since <= failure.since:
                return True  # already dropping the socket for an earlier one
            self._not_recorded = failure
            task = asyncio.ensure_future(ws.close(1011, "events not recorded"))
        elif self._gap_open:
            extended = self._hooks.gap_extended(self._id, failure.since, failure.gap_reason)
            task = asyncio.ensure_future(self._call_hook("gap_extended", extended))
        else:
            return False
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)
        return True

    def _unread_from(self, at: datetime) -> None:
        """What the server sent from ``at`` on may be lost: the connection's gap starts there, or
        earlier if another cause said so (the first moment wins)."""
        if self._unread_since is None or at < self._unread_since:
            self._unread_since = at

    def _silent_since(self) -> datetime:
        """When the server was last known to be heard, for a socket that ended without its close
        frame (a keepalive timeout, 1011; a connection that dropped, 1006).

        On a half-open path (a NAT or firewall that lost its state, a VPN or Wi-Fi blip) what the
        server sends after that is lost, and the close is only noticed when a keepalive ping goes
        unanswered: up to ping interval + ping timeout (+ the close timeout) later, 40-45 s with the
        protocol's settings. The gap starts at the later of the last frame read and the last pong
        that can have come (the keepalive pings every interval, and gave up after the timeout), not
        when the close was noticed. A server's own close frame comes after everything it sent, so
        that close needs none of this.
        """
        options = self._options
        now_mono = self._clock.monotonic()
        heard = self._heard_at
        if options.ping_interval is not None and options.ping_timeout is not None:
            heard = max(
                heard, now_mono - (options.ping_interval + options.ping_timeout + options.close_timeout)
            )
        return self._clock.now() - timedelta(seconds=max(0.0, now_mono - heard))

    async def _subscribed(self) -> None:
        self._connected_at = self._clock.monotonic()
        self._connected_since = self._clock.now()
        self._last_error = None
        logger.info("subscribed to Xelion at %s (%d event types)", self._where, len(self._event_types))
        await self._set_state(SourceState.SUBSCRIBED, None)
        await self._close_gap()

    async def _beat(self, every: float) -> None:
        """While subscribed: store that this source listens, every ``every`` seconds. After a
        ``kill -9`` the next start's gap begins at the last one (``load_state``), not at the last
        event or subscription, which for a quiet integration may be hours before (§18)."""
        while True:
            await asyncio.sleep(every)
            await self._call_hook("heartbeat", self._hooks.heartbeat(self._id, self._clock.now()))

    async def _handle(self, message: str | bytes) -> None:
        parsed = parse_notification(message)
        if parsed is None:
            return
        if parsed.notification_type not in CALL_EVENT_TYPES:
            logger.debug("ignored a %s notification (not a call event)", parsed.notification_type)
            return
        if parsed.notification_type not in self._event_types:
            logger.debug("ignored a %s notification (not subscribed)", parsed.notification_type)
            return
        read_at = self._last_event_at = self._clock.now()
        try:
            await self._hooks.on_event(self._id, parsed.notification_type, normalise_fields(parsed.fields))
        except EventsNotRecorded as exc:
            # An earlier batch's commit failed (logged by the pipeline): lost since its first event.
            raise _HookFailed(str(exc), min(exc.since, read_at)) from exc
        except Exception as exc:
            logger.exception(
                "recording a %s event from Xelion at %s failed", parsed.notification_type, self._where
            )
            raise _HookFailed(type(exc).__name__, read_at) from exc
        ws = self._ws
        if ws is not None and ws.state is not State.OPEN:
            # The socket closed while this event was being handed over: a database that does not
            # commit holds on_event (its backpressure), nothing is read meanwhile, and Xelion's
            # pings end the socket after about 40 s. What the server sent since is lost, so the gap
            # starts when reading stopped, not when the close is noticed after the wait.
            self._unread_from(read_at)

    async def _stop_renewer(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._renewer
            self._renewer = None

    async def _shutdown(self) -> None:
        # The gap starts where reading stopped, not after the close handshake and the renewer's end
        # (up to the close timeout with a server slow to answer the close).
        stopped_at = self._reading_stopped_at or self._clock.now()
        self._reading_stopped_at = None
        await self._stop_renewer()
        ws = self._ws
        self._ws = None
        if ws is not None:
            with contextlib.suppress(Exception):
                await ws.close()
        await self._open_gap(STOPPED_REASON, stopped_at)
        if self._session is not None and self._session.logged_in:
            try:
                async with asyncio.timeout(self._options.logout_timeout):
                    await self._session.logout()
            except (TimeoutError, Exception):
                logger.warning("logging out of Xelion at %s did not finish", self._where)
        self._connected_since = None
        if self._state is not SourceState.FAILED:
            await self._set_state(SourceState.STOPPED, None)

    # -- hooks ------------------------------------------------------------------------------------

    async def _save_token(self, token: str | None) -> None:
        await self._call_hook("save_session_token", self._hooks.save_session_token(self._id, token))

    async def _set_state(self, state: SourceState, error: str | None) -> None:
        if state is self._state and state is not SourceState.BACKOFF:
            return
        self._state = state
        self._since = self._clock.now()
        await self._call_hook("on_state", self._hooks.on_state(self._id, state, error))

    async def _open_gap(self, reason: str, since: datetime | None = None) -> None:
        """Open a gap now, or at ``since`` if that is earlier (events not read or not recorded)."""
        if self._gap_open:
            return
        self._gap_open = True
        now = self._clock.now()
        start = now if since is None or since > now else since
        self._gap_started = (start, self._clock.monotonic())
        await self._call_hook("gap_opened", self._hooks.gap_opened(self._id, start, reason))

    async def _close_gap(self) -> None:
        if not self._gap_open:
            return
        self._gap_open = False
        end = self._clock.now()
        start, opened = self._gap_started
        # At least as long as it lasted by the monotonic clock: a wall clock stepped back while
        # the gap was open stored it ending an hour before it started (a clock-step review's
        # finding), its real length lost. A step forward makes it longer, never shorter.
        end = max(end, start + timedelta(seconds=self._clock.monotonic() - opened))
        await self._call_hook("gap_closed", self._hooks.gap_closed(self._id, end))

    async def _call_hook(self, name: str, awaitable: Awaitable[Any]) -> Any:
        """Await a reporting hook; a failing one is logged, never fatal to the source."""
        try:
            return await awaitable
        except Exception:
            logger.exception("source hook %s failed for Xelion at %s", name, self._where)
            return None


class _TermHooks:
    """The hooks of one ownership term of a source (``xelion/ownership.py``).

    Events always go through: if another replica took over a moment ago, the dedupe key makes an
    event read by both one event. The integration's shared state (its state, gaps, the stored session
    token) is written only while this replica still owns the websocket (``Held.confirm``), so a
    replica that lost it cannot overwrite the new owner's state, reopen a gap the new owner closed,
    or forget the session token the new owner saved. The first gap of a takeover starts where the
    previous owner was last seen (``gap_since``), not when this replica's source started.
    """

    def __init__(self, hooks: SourceHooks, held: Held, gap_since: datetime | None) -> None:
        self._hooks = hooks
        self._held = held
        self._gap_since = gap_since
        # Every event goes straight through (the hot path: no extra coroutine per event).
        self.on_event = hooks.on_event

    async def on_state(self, xelion_context_id: int, state: SourceState, error: str | None) -> None:
        if await self._held.confirm():
            await self._hooks.on_state(xelion_context_id, state, error)

    async def gap_opened(self, xelion_context_id: int, started_at: datetime, reason: str) -> None:
        since, self._gap_since = self._gap_since, None
        if since is not None and since < started_at:
            started_at = since
        if await self._held.confirm():
            await self._hooks.gap_opened(xelion_context_id, started_at, reason)

    async def gap_closed(self, xelion_context_id: int, ended_at: datetime) -> None:
        if await self._held.confirm():
            await self._hooks.gap_closed(xelion_context_id, ended_at)

    async def gap_extended(self, xelion_context_id: int, started_at: datetime, reason: str) -> None:
        if await self._held.confirm():
            await self._hooks.gap_extended(xelion_context_id, started_at, reason)

    async def heartbeat(self, xelion_context_id: int, at: datetime) -> None:
        if await self._held.confirm():
            await self._hooks.heartbeat(xelion_context_id, at)

    async def load_session_token(self, xelion_context_id: int) -> str | None:
        return await self._hooks.load_session_token(xelion_context_id)

    async def load_state(self, xelion_context_id: int) -> tuple[str | None, datetime | None]:
        return await self._hooks.load_state(xelion_context_id)

    async def save_session_token(self, xelion_context_id: int, token: str | None) -> None:
        if await self._held.confirm():
            await self._hooks.save_session_token(xelion_context_id, token)


@dataclass(eq=False)
class _Entry:
    config: SourceConfig
    task: asyncio.Task[None] | None = None
    source: XelionSource | None = None  # the running term's source; None while standing by
    standby_since: datetime | None = None


class SourceManager:
    """Runs one :class:`XelionSource` per integration, each in its own asyncio task.

    A source runs only while this replica owns its integration's websocket (``ownership``; with the
    default :class:`LocalOwnership`, always). Until then it stands by (state ``STANDBY``, written
    nowhere: the owner's state is the integration's); when the ownership is lost the source stops
    without writing anything and stands by again.

    Every public coroutine is serialised by one lock, so concurrent calls for the same integration
    cannot race. Cancelling a caller while it waits for a source to stop does not interrupt that
    source's shutdown (it finishes in its own task).
    """

    def __init__(
        self,
        hooks: SourceHooks,
        client: httpx.AsyncClient,
        options: SourceOptions | None = None,
        ownership: Ownership | None = None,
    ) -> None:
        self._hooks = hooks
        self._client = client
        self._options = options or SourceOptions()
        self._ownership: Ownership = ownership or LocalOwnership()
        self._entries: dict[int, _Entry] = {}
        self._lock = asyncio.Lock()

    async def start(self, config: SourceConfig) -> None:
        """Start the source of ``config.xelion_context_id``.

        If it is already running this is :meth:`update`; if it had failed, it starts afresh.
        Cancellation: nothing is left half-started (the task is created without awaiting).
        """
        async with self._lock:
            entry = self._entries.get(config.xelion_context_id)
            if entry is not None and entry.task is not None and not entry.task.done():
                await self._update_locked(entry, config, retry_failed=False)
                return
            self._start_locked(config)

    async def stop(self, xelion_context_id: int) -> None:
        """Stop that integration's source and log it out; a no-op if it is not running.

        Cancellation: the source still finishes stopping in its own task.
        """
        async with self._lock:
            entry = self._entries.pop(xelion_context_id, None)
            if entry is not None:
                await self._stop_entry(entry)

    async def restart(self, config: SourceConfig) -> None:
        """Stop (with logout) and start again with ``config``. Cancellation: as :meth:`stop`."""
        async with self._lock:
            entry = self._entries.pop(config.xelion_context_id, None)
            await self._replace_locked(entry, config)

    async def update(self, config: SourceConfig, *, retry_failed: bool = False) -> None:
        """Apply a configuration change without needless reconnects.

        Only the event types changed: re-subscribe on the live socket. Target or admin credentials
        changed: restart (so a ``FAILED`` source runs again once its credentials change, §3.6).
        With ``retry_failed`` (an operator's change through this replica's API) a ``FAILED``
        source restarts, its credentials the same or not: an operator who put the password back at
        Xelion and confirmed it here (``admin/password/update``, checked with Xelion first) found
        the source still failed, and every call lost until the process restarted (an operations
        review's finding). Otherwise nothing changed: no-op (the replicas' periodic pass must not
        try a refused login again every poll). Not running: start.
        Cancellation: as :meth:`restart`.
        """
        async with self._lock:
            entry = self._entries.get(config.xelion_context_id)
            if entry is None:
                self._start_locked(config)
                return
            await self._update_locked(entry, config, retry_failed=retry_failed)

    async def stop_all(self) -> None:
        """Stop every source at once and log each out (what SIGTERM triggers, reliability.md §20).

        Cancellation: the sources still finish stopping in their own tasks.
        """
        async with self._lock:
            entries = list(self._entries.values())
            self._entries.clear()
            await asyncio.gather(*(self._stop_entry(entry) for entry in entries), return_exceptions=True)

    def events_not_recorded(self, xelion_context_id: int, failure: EventsNotRecorded) -> bool:
        """Tell the integration's running source that its events could not be committed
        (``XelionSource.not_recorded``); False when none runs here (the caller keeps the failure)."""
        entry = self._entries.get(xelion_context_id)
        if entry is None or entry.source is None:
            return False
        return entry.source.not_recorded(failure)

    def running(self) -> frozenset[int]:
        """The integrations that have a source here (running, standing by, or failed)."""
        return frozenset(self._entries)

    def status(self, xelion_context_id: int) -> SourceStatus:
        """The status of one source; ``STOPPED`` for an integration without a running source."""
        entry = self._entries.get(xelion_context_id)
        if entry is None:
            return SourceStatus(state=SourceState.STOPPED)
        return self._status(entry)

    def statuses(self) -> dict[int, SourceStatus]:
        return {context_id: self._status(entry) for context_id, entry in self._entries.items()}

    # -- internals --------------------------------------------------------------------------------

    def _status(self, entry: _Entry) -> SourceStatus:
        if entry.source is not None:
            return entry.source.status()
        if entry.standby_since is None:
            # Between two sources of a restart (the old one still logging out): nothing listens.
            return SourceStatus(state=SourceState.STOPPED)
        if self._ownership.held_elsewhere(entry.config.xelion_context_id):
            return SourceStatus(state=SourceState.STANDBY, since=entry.standby_since)
        # Waiting for the ownership without knowing that another replica listens (the database
        # does not answer): not a standby, and not ready.
        return SourceStatus(
            state=SourceState.CONNECTING,
            since=entry.standby_since,
            last_error="waiting for the websocket's ownership (the database lock)",
        )

    def _start_locked(
        self, config: SourceConfig, held: Held | None = None, after: asyncio.Task[None] | None = None
    ) -> None:
        entry = _Entry(config=config)
        entry.task = asyncio.create_task(
            self._run_owned(entry, held, after), name=f"xelion-source-{config.xelion_context_id}"
        )
        entry.task.add_done_callback(self._task_done)
        self._entries[config.xelion_context_id] = entry

    async def _replace_locked(self, entry: _Entry | None, config: SourceConfig) -> None:
        """Stop ``entry`` (if any) and start ``config`` after it. The ownership this replica holds
        goes straight to the new source (``retain``), so no other replica takes over in between."""
        if entry is None or entry.task is None:
            self._start_locked(config)
            return
        held = self._ownership.retain(config.xelion_context_id)
        # The new task owns ``held`` from here on and starts once the old one has stopped.
        self._start_locked(config, held, after=entry.task)
        await self._stop_entry(entry)

    async def _run_owned(self, entry: _Entry, held: Held | None, after: asyncio.Task[None] | None) -> None:
        """Stand by until this replica owns the websocket, run the source while it does, repeat.

        Returns when the source ends by itself (``FAILED``). Cancellation: the source stops (logs
        out, reports ``STOPPED`` if still the owner) and the ownership is let go.
        """
        ctx = entry.config.xelion_context_id
        gap_since: datetime | None = None
        try:
            if after is not None:
                await asyncio.wait({after})
            while True:
                if held is None:
                    entry.source = None
                    entry.standby_since = self._clock_now()
                    held = await self._ownership.acquire(ctx)
                    entry.standby_since = None
                # Where the first gap of this term starts: a takeover's where the other owner was
                # last seen holding the websocket (earlier if it may have vanished unseen); after
                # this replica's own loss with nobody else in between, where it lost it.
                if held.since is not None:
                    since: datetime | None = await self._takeover_since(ctx, held)
                elif gap_since is not None:
                    since = gap_since
                else:
                    since = await self._restart_since(ctx)
                hooks = _TermHooks(self._hooks, held, since)
                source = XelionSource(entry.config, hooks, self._client, self._options)
                entry.source = source
                run = asyncio.create_task(source.run(), name=f"xelion-source-run-{ctx}")
                lost = asyncio.create_task(held.lost.wait(), name=f"xelion-source-owned-{ctx}")
                try:
                    await asyncio.wait({run, lost}, return_when=asyncio.FIRST_COMPLETED)
                    # The websocket is this replica's no longer from here: a gap of its next term
                    # starts now, not after the source's shutdown (its close and logout).
                    lost_at = self._clock_now()
                finally:
                    lost.cancel()
                    if not run.done():
                        run.cancel()
                        await asyncio.wait({run})  # the source's own shutdown, uninterrupted
                if not held.lost.is_set() or (run.done() and not run.cancelled()):
                    run.result()  # ended by itself: FAILED (or a bug, raised here)
                    return
                gap_since = lost_at
                logger.warning("this replica lost the websocket of integration %d; standing by", ctx)
                await self._ownership.release(held)
                held = None
        finally:
            if held is not None:
                await self._ownership.release(held)

    def _clock_now(self) -> datetime:
        return self._options.clock.now()

    async def _restart_since(self, xelion_context_id: int) -> datetime | None:
        """The start of the first gap when nobody else was seen holding the websocket (a start of
        the daemon, a restart of the source, a replica taking an integration nobody held).

        A source that stopped cleanly (stored ``stopped`` or ``failed``) left a gap open when it
        stopped, which the new one joins: None. One that ended without a word (``kill -9``, a crash,
        a lost host: its stored state says it was still listening) gave no stop time; it was
        listening at the last moment the store knows of (``load_state``: its last stored event, less
        the second it may have been written late, the subscription that ended its last gap, or its
        last heartbeat), so the gap starts there: never before that gap ended, so the two do not
        overlap. It may be longer than the outage (by at most the heartbeat interval), never shorter
        (reliability.md §18).
        """
        state, listened_at = await self._stored_state(xelion_context_id)
        if state in (None, SourceState.STOPPED, SourceState.FAILED) or listened_at is None:
            return None
        return listened_at

    async def _stored_state(self, xelion_context_id: int) -> tuple[str | None, datetime | None]:
        """``load_state``, or (None, None) when the database does not answer (logged): a gap then
        starts as if nothing were known of the previous owner."""
        try:
            return await self._hooks.load_state(xelion_context_id)
        except Exception:
            logger.warning("reading the stored source state failed", exc_info=True)
            return None, None

    async def _takeover_since(self, xelion_context_id: int, held: Held) -> datetime:
        """The start of a takeover's gap: never later than the moment nobody listened any more
        (reliability.md §18), and no earlier than needed.

        The standby last saw the other replica hold the lock at ``held.since``. If that replica
        stopped cleanly (the stored state is ``stopped`` or ``failed``), it listened until then.
        Otherwise (it crashed, hung, its host vanished, it lost the lock) it listened at least until
        the last moment the store knows of (``load_state``: its last event less a second, its last
        subscription, its last heartbeat), and may have stopped right after: the gap starts there,
        at most a heartbeat interval early. Without any of those (a database of an older version),
        it is assumed to have read until ``silent_loss`` before the server let go of its lock. An
        earlier drop of its socket left a gap open, which the new owner's gap joins.
        """
        assert held.since is not None
        state, listened_at = await self._stored_state(xelion_context_id)
        if state in (SourceState.STOPPED, SourceState.FAILED):
            return held.since
        if listened_at is not None:
            # The last proof that it listened (``load_state``: an event, its subscription, a
            # heartbeat): it may have stopped right after. Not ``silent_loss`` before the lock went,
            # which assumed it read until its host vanished: a hung process (SIGSTOP, a frozen VM)
            # stops reading long before, and its gap was short by the time it hung.
            return min(held.since, listened_at)
        return held.since - self._ownership.silent_loss

    async def _update_locked(self, entry: _Entry, config: SourceConfig, *, retry_failed: bool) -> None:
        old = entry.config
        same_connection = (
            old.target == config.target
            and old.admin_username == config.admin_username
            and old.admin_password == config.admin_password
        )
        ended = retry_failed and entry.task is not None and entry.task.done()  # FAILED: gave up
        if not same_connection or ended:
            self._entries.pop(config.xelion_context_id, None)
            await self._replace_locked(entry, config)
            return
        entry.config = config
        source = entry.source
        if source is None:
            return  # standing by: the next term starts with ``config``
        source.config = config
        running = entry.task is not None and not entry.task.done()
        if frozenset(config.event_types) != source.event_types and running:
            await source.set_event_types(frozenset(config.event_types))

    @staticmethod
    async def _stop_entry(entry: _Entry) -> None:
        # Cancel the task itself, not through the source: a task that has not started running yet
        # has no source-side handle, and cancelling it before it runs is a complete stop.
        if entry.task is None:
            return
        entry.task.cancel()
        await asyncio.wait([entry.task])

    @staticmethod
    def _task_done(task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            logger.error("a Xelion source stopped unexpectedly: %s", type(exc).__name__, exc_info=exc)
