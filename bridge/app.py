"""Wiring and lifecycle: store, policy engine, executor, worker, web routes.

Start order: open the store (fail fast with a database error), listen (Synapse may push
transactions at once; they are stored even before the homeserver answers us), wait for
the homeserver, register the bot, bootstrap the management room, ping the homeserver,
then start the worker and executor and report ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

from aiohttp import ClientError, ClientSession, ClientTimeout, web
from mautrix.errors import MatrixError, MatrixRequestError
from mautrix.types import RoomAlias, RoomID, UserID

from bridge import __version__, metrics
from bridge.archive.jobs import run_audit_jobs
from bridge.archive.sink import AuditSink
from bridge.commands import CommandRegistry, Reply
from bridge.commands import audit as audit_commands
from bridge.commands import core as core_commands
from bridge.commands import dlp as dlp_commands
from bridge.commands import rooms as room_commands
from bridge.config import Config, ConfigError, load_config
from bridge.http.gate import Gate
from bridge.http.health import health_routes
from bridge.http.transactions import AppserviceAPI
from bridge.logs import setup_logging
from bridge.matrix import (
    PING_RETRY_DELAYS,
    AdminAPI,
    HomeserverUnreachable,
    make_client,
    ping_homeserver,
    ping_is_transient,
    ping_until_reached,
    register_bot,
    wait_for_homeserver,
)
from bridge.pipeline import retroactive
from bridge.pipeline.enforcement import RoomEnforcer
from bridge.pipeline.executor import Executor, RateLimiter, RoomEnforcement
from bridge.pipeline.live_policy import SECTIONS, SPACES_KEY, LivePolicy, runtime_key
from bridge.pipeline.redelivery import RedeliveryNudger
from bridge.pipeline.sweeper import RetentionSweeper
from bridge.pipeline.worker import Worker, notice, notify_text
from bridge.policy.model import Action, Verdict
from bridge.store import ActionRow, AuditEntry, NewAction, Store, StoreUnavailable

log = logging.getLogger(__name__)

MANAGEMENT_ROOM_KEY = "management_room"
SHUTDOWN_STEP = 10.0  # seconds each shutdown step may take
AUTO_ENROLL_RETRY = (5, 15, 60, 300)  # seconds between attempts while Synapse or the DB fails


def build_registry() -> CommandRegistry:
    """Every command group the bridge offers."""
    registry = CommandRegistry()
    core_commands.register(registry)
    core_commands.register_reload(registry)
    dlp_commands.register(registry)
    room_commands.register(registry)
    audit_commands.register(registry)
    return registry


class Bridge:
    """One running bridge. Also the ``services`` object command handlers see."""

    def __init__(self, config: Config, config_path: Path | None = None) -> None:
        self.config = config
        self.config_path = config_path
        self.started_monotonic = time.monotonic()
        self.version = __version__
        self.management_room: str = ""
        self.ready = False
        self.accepting = True
        self.exit_code = 0
        self.policy = LivePolicy(config)
        self.registry = build_registry()
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[Any]] = []
        self._background: set[asyncio.Task[Any]] = set()
        self.store: Store
        self.session: ClientSession
        self.runner: web.AppRunner | None = None

    # -- building -----------------------------------------------------------------------

    def build_web(self) -> web.Application:
        """The aiohttp application with every route the bridge serves."""
        app = web.Application(client_max_size=self.config.appservice.max_body_size)
        self.sink = AuditSink(self.store)
        self.appservice_api = AppserviceAPI(
            self.store,
            self.config.appservice.hs_token,
            allow_query_token=self.config.appservice.allow_query_token,
            on_committed=lambda: self.worker.wake(),
            accepting=lambda: self.accepting,
            on_refused=self.redelivery.refused,
        )
        self.gate = Gate(
            self.config.gate.base_path,
            self.config.gate.token,
            lambda: self.policy.engine,
            self.sink,
            on_blocked=self._gate_blocked,
        )
        app.add_routes(self.appservice_api.routes())
        app.add_routes(self.gate.routes())
        app.add_routes(health_routes(self))
        return app

    async def open(self) -> None:
        """Open the store and start listening. Raises StoreUnavailable / OSError."""
        from bridge.archive.setup import open_store

        # the encrypted audit store: keyring + checkpoint signing key from `audit:`
        self.store = await open_store(self.config)
        self.session = ClientSession(timeout=ClientTimeout(total=60))
        self.client = make_client(
            self.config.homeserver.url,
            self.config.appservice.as_token,
            self.config.bot_mxid,
            self.session,
        )
        self.admin = (
            AdminAPI(self.config.homeserver.url, self.config.homeserver.admin_token, self.session)
            if self.config.homeserver.admin_token
            else None
        )
        self.rooms = RoomEnforcer(
            self.store,
            lambda: float(self.config.federation.get("rollout_rate", 10.0)),
            self._notify_management,
            own_server=self.config.homeserver.domain,
            command_prefix=self.config.bridge.command_prefix,
        )
        await self.rooms.load()
        self.executor = Executor(
            self.store,
            self.client,
            self.config.executor,
            self.admin,
            on_permanent_failure=self._report_failure,
            rooms=RoomEnforcement(
                plan=lambda room, state: self.policy.engine.plan_room(room, state),
                on_state=self.rooms.on_state,
                on_result=self._on_reconciled,
            ),
        )
        self.worker = Worker(
            self.store,
            lambda: self.config,
            lambda: self.policy.engine,
            self.registry,
            self,
            on_actions=self.executor.wake,
        )
        await self.worker.load()
        await self._load_runtime_policy()
        self.sweeper = RetentionSweeper(
            self.store,
            lambda: self.policy.engine,
            lambda: self.config,
            purge=lambda: self.executor.admin is not None,
            management_room=lambda: self.management_room,
            on_actions=self.executor.wake,
        )
        await self.sweeper.load()
        self.redelivery = RedeliveryNudger(
            self.store.db.reachable, lambda: ping_until_reached(self._ping_once)
        )
        stored_room = await self.store.state.get(MANAGEMENT_ROOM_KEY)
        self.management_room = self.config.bridge.management_room or stored_room or ""
        self.runner = web.AppRunner(
            self.build_web(),
            access_log=None,
            handle_signals=False,
            shutdown_timeout=SHUTDOWN_STEP,
        )
        await self.runner.setup()
        site = web.TCPSite(
            self.runner, self.config.appservice.hostname, self.config.appservice.port
        )
        await site.start()
        self._spawn(self.sink.run(), "audit-sink")
        self._spawn(self._refresh_metrics(), "metrics")
        log.info(
            "listening on %s:%d (database: %s)",
            self.config.appservice.hostname,
            self.config.appservice.port,
            self.store.db.backend,
        )

    async def _load_runtime_policy(self) -> None:
        """Apply the runtime policy documents and room→space map kept in the store."""
        spaces = LivePolicy.decode(await self.store.state.get(SPACES_KEY))
        self.policy.room_spaces = {room: tuple(ids) for room, ids in spaces.items()}
        for section in SECTIONS:
            doc = LivePolicy.decode(await self.store.state.get(runtime_key(section)))
            try:
                self.policy.apply(doc, section=section)
            except ValueError as e:
                log.error(
                    "the runtime %s rules in the database are invalid, ignored: %s", section, e
                )

    def _spawn(self, coro: Any, name: str, *, critical: bool = True) -> None:
        """Run ``coro`` in the background until shutdown.

        A critical task (the worker, the executor, ...) that dies stops the bridge with exit
        code 1, so a supervisor restarts it; a one-off task (a reload, auto-enrolment, a
        ping) that fails is logged and the bridge carries on.
        """
        task = asyncio.create_task(coro, name=name)
        task.add_done_callback(self._task_done if critical else self._one_off_done)
        self._tasks.append(task)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.error("background task %s died: %r", task.get_name(), exc, exc_info=exc)
            self.exit_code = self.exit_code or 1
            self._stop.set()

    @staticmethod
    def _one_off_done(task: asyncio.Task[Any]) -> None:
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("%s failed: %r", task.get_name(), exc, exc_info=exc)

    # -- startup ------------------------------------------------------------------------

    async def startup(self) -> None:
        """Talk to the homeserver, then start processing. Raises HomeserverUnreachable."""
        cfg = self.config
        await wait_for_homeserver(self.session, cfg.homeserver.url, cfg.homeserver.startup_timeout)
        await register_bot(self.client, cfg.appservice.bot_localpart)
        if cfg.appservice.bot_displayname:
            try:
                await self.client.set_displayname(cfg.appservice.bot_displayname)
            except MatrixError as e:
                log.warning("could not set the bot's display name: %s", e)
        await self._bootstrap_management_room()
        await self._ping_homeserver()
        await self._rollout_if_policy_changed()
        self._spawn(self.worker.run(), "worker")
        self._spawn(self.executor.run(), "executor")
        resumed = await retroactive.resume(self)
        if resumed:
            log.info("resumed %d unfinished retroactive DLP scan(s)", resumed)
        self._spawn(self.redelivery.run(), "redelivery")
        self._spawn(self.sweeper.run(), "retention-sweeper")
        self._spawn(run_audit_jobs(self), "audit-jobs")  # archive expiry, checkpoint notices
        if cfg.bridge.auto_enroll and self.admin is not None:
            self._spawn(self._auto_enroll(), "auto-enroll", critical=False)
        self.ready = True
        log.info("bridge ready (bot %s, management room %s)", cfg.bot_mxid, self.management_room)

    async def _ping_once(self) -> int:
        txn_id = f"ping-{time.time_ns()}"
        return await ping_homeserver(self.client, self.config.appservice.id, txn_id)

    async def _ping_homeserver(self) -> None:
        """Ask Synapse to call us back: proves the registration works and makes Synapse
        replay the transactions it queued while we were down now, not after its backoff.

        A transient failure (Synapse could not reach us yet, or the ping raced its own retry)
        is repeated in the background so startup does not wait for it.
        """
        cfg = self.config

        def failed(e: MatrixRequestError) -> None:
            log.error(
                "appservice ping failed (%s: %s): check that the registration's url (%s) "
                "reaches this bridge and the tokens match",
                e.errcode,
                e.message,
                cfg.appservice.address,
            )

        try:
            rtt = await self._ping_once()
        except MatrixRequestError as e:
            if not ping_is_transient(e):
                failed(e)
                return
            log.info("appservice ping failed (%s); retrying in the background", e.errcode)
        else:
            log.info("homeserver reached the bridge through the appservice ping (%d ms)", rtt)
            return

        async def keep_pinging() -> None:
            await asyncio.sleep(PING_RETRY_DELAYS[0])
            try:
                rtt, attempts = await ping_until_reached(self._ping_once, PING_RETRY_DELAYS[1:])
            except MatrixRequestError as e:
                failed(e)
            except Exception as e:  # best effort: Synapse's own backoff still delivers
                log.warning("appservice ping gave up: %r", e)
            else:
                log.info(
                    "homeserver reached the bridge through the appservice ping (%d ms, attempt %d)",
                    rtt,
                    attempts + 1,
                )

        self._spawn(keep_pinging(), "appservice-ping", critical=False)

    async def _bootstrap_management_room(self) -> None:
        cfg = self.config
        room = cfg.bridge.management_room
        if room.startswith("#"):
            resolved = await self.client.resolve_room_alias(RoomAlias(room))
            room = str(resolved.room_id)
        if not room:
            room = await self.store.state.get(MANAGEMENT_ROOM_KEY) or ""
        if room:
            try:
                await self.client.join_room_by_id(RoomID(room))
            except MatrixRequestError as e:
                log.error("cannot join the management room %s: %s", room, e.message)
        else:
            admins = [u for u, r in cfg.bridge.permissions.items() if r == "admin" and "*" not in u]
            room = str(
                await self.client.create_room(
                    name="Policy bridge management",
                    topic="Commands and reports of the policy bridge. Type !policy help.",
                    invitees=[UserID(a) for a in admins],
                    is_direct=False,
                    # Room version 12 makes the creator (the bot) all-powerful already;
                    # listing it in users is refused.
                    power_level_override=cast(Any, {"users": dict.fromkeys(admins, 100)}),
                )
            )
            await self.store.state.set(MANAGEMENT_ROOM_KEY, room)
            log.info("created the management room %s and invited %d admins", room, len(admins))
        self.management_room = room
        self.policy.set_management_room(room)
        self.worker.joined_rooms.add(room)
        await self.store.rooms.upsert(room, joined=True)

    async def _auto_enroll(self) -> None:
        """Enrol every room of the homeserver; retried while the homeserver or the database
        fails, given up (and reported) when the admin API refuses the token."""
        for delay in (*AUTO_ENROLL_RETRY, None):
            try:
                await self._auto_enroll_once()
                return
            except MatrixRequestError as e:
                if 400 <= e.http_status < 500:
                    log.error(
                        "auto-enrolment impossible: the admin API refused homeserver.admin_token "
                        "(%s %s)",
                        e.http_status,
                        e.errcode,
                    )
                    with contextlib.suppress(StoreUnavailable):
                        await self._notify_management(
                            Reply.plain(
                                "⚠️ auto-enrolment failed: Synapse's admin API refused the "
                                f"bridge's admin token ({e.errcode}). Rooms are not enrolled "
                                "until it is fixed and the bridge restarted."
                            )
                        )
                    return
                failure: Exception = e
            except (StoreUnavailable, ClientError, TimeoutError) as e:
                failure = e
            if delay is None:
                log.error("auto-enrolment gave up: %r", failure)
                return
            log.warning("auto-enrolment failed (%r); retrying in %ds", failure, delay)
            await asyncio.sleep(delay)

    async def _auto_enroll_once(self) -> None:
        assert self.admin is not None
        rooms = await self.admin.list_rooms()
        known = {r["room_id"] for r in await self.store.rooms.known() if r["joined"]}
        todo = [r for r in rooms if r not in known]
        actions = []
        for room in todo:
            actions.append(
                NewAction("make_room_admin", {"user_id": self.config.bot_mxid}, room_id=room)
            )
            # Due at once, but ordered after every make_room_admin (the queue runs by
            # not_before, then creation time, which ties within a batch): joining a
            # private room before make_room_admin's invite would be refused.
            actions.append(NewAction("join", {}, room_id=room, not_before=1.0))
        if actions:
            await self.executor.submit(actions)
        log.info("auto-enrolment: %d of %d rooms queued", len(todo), len(rooms))

    def _gate_blocked(self, subject: Mapping[str, Any], verdict: Verdict) -> None:
        """`notify` rules on events the gate refused: tell the management room."""
        wanted = [f for f in verdict.findings if Action.NOTIFY in f.actions]
        if not wanted or not self.management_room:
            return
        lines = [
            notify_text(f, "blocked", subject.get("sender"), subject.get("room_id")) for f in wanted
        ]
        task = asyncio.get_running_loop().create_task(
            self._notify_management(Reply.plain("\n".join(lines)))
        )
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _notify_management(self, reply: Reply) -> None:
        if self.management_room:
            await self.executor.submit([notice(self.management_room, reply)])

    async def _on_reconciled(self, room_id: str, result: dict[str, Any]) -> None:
        await self.rooms.on_result(room_id, result)
        lacking = result.get("lacking") or []
        payload = result.get("payload") or {}
        if (
            lacking
            and self.admin is not None
            and self.config.bridge.obtain_power
            and not payload.get("after_admin")
        ):
            log.info("obtaining power in %s through make_room_admin", room_id)
            await self.executor.submit(
                [
                    NewAction(
                        "make_room_admin", {"user_id": self.config.bot_mxid}, room_id=room_id
                    ),
                    self.rooms.reconcile(room_id, "after make_room_admin", after_admin=True),
                ]
            )

    async def _rollout_if_policy_changed(self) -> None:
        """After a restart with a changed config, bring every managed room in line."""
        import hashlib
        import json

        doc = {
            "federation": self.config.federation,
            "retention": self.config.retention,
            "runtime": {k: self.policy.runtime.get(k) for k in ("federation", "retention")},
        }
        fingerprint = hashlib.sha256(
            json.dumps(doc, sort_keys=True, default=str).encode()
        ).hexdigest()
        if await self.store.state.get("policy.fingerprint") == fingerprint:
            return
        rooms = [
            r["room_id"]
            for r in await self.store.rooms.known()
            if r["joined"] and r["room_id"] != self.management_room
        ]
        acts, record = self.rooms.rollout(rooms, "policy changed since the last start")
        await self.store.actions.enqueue(acts)
        await self.store.state.set("policy.fingerprint", fingerprint)
        await self.store.state.set("rollout", json.dumps(record))
        self.rooms.start_rollout(record)
        self.executor.wake()
        log.info("policy changed since the last start: %d rooms to bring in line", len(rooms))

    async def _report_failure(self, action: ActionRow, reason: str) -> None:
        # Notices cannot report themselves; a reconcile's failure is the room enforcer's to
        # report (batched per rollout, once per room), not one notice per room here.
        if not self.management_room or action.kind in ("send_notice", "reconcile"):
            return
        await self.executor.submit(
            [notice(self.management_room, Reply.plain(f"⚠️ {action.kind} failed: {reason}"))]
        )

    # -- running ------------------------------------------------------------------------

    def request_stop(self, code: int = 0) -> None:
        self.exit_code = self.exit_code or code
        self._stop.set()

    async def reload(self, who: str) -> tuple[bool, list[str]]:
        """Re-read the config file; apply policies, roles and rules without a restart.

        An invalid file is rejected with its problems and the running config stays. Options
        that only take effect at start (listener, database, tokens) are named.
        """
        if self.config_path is None:
            return False, ["the bridge was started without a config file"]
        try:
            new = await asyncio.to_thread(load_config, self.config_path)
            policy = LivePolicy(new, self.policy.runtime)
            policy.management_room = self.management_room
            policy.set_room_spaces(self.policy.room_spaces)
        except ConfigError as e:
            log.error("reload by %s rejected; the old config stays: %s", who, e)
            return False, list(e.problems)
        except ValueError as e:
            log.error("reload by %s rejected; the old config stays: %s", who, e)
            return False, [str(e)]
        old = self.config
        restart = [
            name
            for name in ("appservice", "gate", "database", "homeserver")
            if getattr(old, name) != getattr(new, name)
        ]
        if old.data_dir != new.data_dir:
            restart.append("data_dir")
        changed = [
            name
            for name in ("bridge", "executor", "logging", "dlp", "federation", "retention")
            if getattr(old, name) != getattr(new, name)
        ]
        self.config = new
        self.policy = policy
        self.executor.config = new.executor
        self.executor.limiter = RateLimiter(new.executor.rate_per_second)
        setup_logging(new.logging.level, new.logging.format)
        await self.sink_append(
            AuditEntry(
                kind="config",
                sender=who if who.startswith("@") else None,
                data={"event": "reload", "by": who, "changed": changed, "needs_restart": restart},
            )
        )
        notes = [f"changed: {', '.join(changed) or 'nothing'}"]
        if restart:
            notes.append(f"these take effect only after a restart: {', '.join(restart)}")
        log.info("config reloaded by %s (%s)", who, "; ".join(notes))
        if changed and any(c in changed for c in ("federation", "retention")):
            await self._rollout_if_policy_changed()
        return True, notes

    async def count_expiring(self, scope: str, ms: int) -> tuple[int, int]:
        """(messages, rooms) a retention of ``ms`` at ``scope`` would delete that the
        policy in force would not yet (for the confirmation of ``retention set``)."""
        doc = self.policy.doc("retention")
        doc.setdefault(scope, {})["max_lifetime"] = f"{ms}ms"
        try:
            candidate = self.policy.preview(doc, "retention")
        except ValueError:
            return 0, 0  # the command refuses the change itself
        return await self.sweeper.count_expiring(scope, candidate, self.policy.engine)

    async def sink_append(self, entry: AuditEntry) -> None:
        """Record an audit entry now if possible, else through the background sink."""
        try:
            await self.store.records.append([entry])
        except StoreUnavailable:
            self.sink.submit(entry)

    async def _refresh_metrics(self) -> None:
        """Keep the gauges that come from the store current (every 15 s)."""
        while True:
            try:
                stats = await self.store.stats.snapshot()
                metrics.QUEUE_DEPTH.set(stats.queue_depth)
                metrics.QUEUE_LAG.set(stats.queue_lag_s)
                metrics.ACTIONS_BACKLOG.labels("pending").set(stats.actions_pending)
                metrics.ACTIONS_BACKLOG.labels("failed").set(stats.actions_failed)
                metrics.AUDIT_RECORDS.set(stats.records)
                cp_ts = self.store.records.last_checkpoint_ts
                if cp_ts:
                    metrics.CHECKPOINT_AGE.set(max(0.0, time.time() - cp_ts / 1000))
            except Exception as e:
                log.warning("could not refresh metrics: %s", e.__class__.__name__)
            await asyncio.sleep(15)

    async def run(self) -> int:
        """Open, start, serve until a stop signal; returns the process exit code."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        loop.add_signal_handler(
            signal.SIGHUP,
            lambda: self._spawn(self._reload_quietly("SIGHUP"), "reload", critical=False),
        )
        await self.open()
        try:
            startup = asyncio.create_task(self.startup())
            stop = asyncio.create_task(self._stop.wait())
            done, _ = await asyncio.wait({startup, stop}, return_when=asyncio.FIRST_COMPLETED)
            if startup in done:
                startup.result()  # raises HomeserverUnreachable etc.
                await self._stop.wait()
            else:
                startup.cancel()
        finally:
            await self.close()
        return self.exit_code

    async def _reload_quietly(self, who: str) -> None:
        ok, notes = await self.reload(who)
        if self.management_room:
            text = ("✅ configuration reloaded: " if ok else "⚠️ reload rejected: ") + "; ".join(
                notes
            )
            try:
                await self._notify_management(Reply.plain(text))
            except StoreUnavailable as e:  # the reload itself took effect; only the notice is lost
                log.warning("could not post the reload result to the management room: %s", e)

    async def close(self) -> None:
        """Stop taking transactions, let the commit in flight finish, stop tasks, close.

        Every step is bounded, so SIGTERM ends the process within about half a minute even
        if the homeserver or the database hangs. Unfinished executor actions stay queued.
        """
        self.accepting = False
        self.ready = False
        if self.runner is not None:
            # Stop listening; new requests on open connections get 503; handlers in flight
            # finish their commit (bounded by the runner's shutdown_timeout).
            try:
                await asyncio.wait_for(self.runner.cleanup(), SHUTDOWN_STEP + 5)
            except TimeoutError:
                log.warning("in-flight requests did not finish within %ss", SHUTDOWN_STEP)
        for task in [*self._tasks, *self._background]:
            task.cancel()
        await asyncio.gather(*self._tasks, *self._background, return_exceptions=True)
        try:  # membership changes not yet written (for the federation confirmation counts)
            await asyncio.wait_for(self.rooms.close(), SHUTDOWN_STEP)
        except Exception as e:
            log.warning("could not store the last membership changes: %r", e)
        try:
            await asyncio.wait_for(self.sink.flush(), SHUTDOWN_STEP)
        except Exception as e:
            log.warning("could not write %d buffered audit records: %s", self.sink.pending, e)
        await self.session.close()
        try:
            # Signs the final checkpoint; bounded in case the database hangs.
            await asyncio.wait_for(self.store.close(), SHUTDOWN_STEP)
        except Exception as e:
            log.warning("closing the store failed: %s", e.__class__.__name__)
        log.info("bridge stopped")


__all__ = ["Bridge", "HomeserverUnreachable", "build_registry"]
