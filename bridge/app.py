"""Wiring and lifecycle: store, policy engine, executor, worker, web routes.

Start order: open the store (fail fast with a database error), listen (Synapse may push
transactions at once; they are stored even before the homeserver answers us), wait for
the homeserver, register the bot, bootstrap the management room, ping the homeserver,
then start the worker and executor and report ready.

Every background task runs under the one :class:`~bridge.scheduler.Scheduler`; what the
bridge does lives in the pipeline modules this file wires together (management room,
enrolment, rollout, reload, ping).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from aiohttp import ClientSession, ClientTimeout, web
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from mautrix.errors import MatrixError
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection

from bridge import __version__, metrics
from bridge.archive.cli import verify_store
from bridge.archive.jobs import CheckpointSigner, run_audit_jobs
from bridge.archive.setup import audit_config
from bridge.archive.sink import AuditSink
from bridge.attachments.pool import ExtractionPool
from bridge.audit.chain import VerifyReport
from bridge.commands import Reply
from bridge.commands.catalog import build_registry
from bridge.commands.services import RetroScan
from bridge.config import Config
from bridge.console.web import build_console
from bridge.e2ee.seam import RoomCrypto
from bridge.http.gate import Gate
from bridge.http.health import (
    HealthInfo,
    health_routes,
    main_listener_metrics,
    refresh_gauges,
    start_metrics_listener,
)
from bridge.http.media_gate import MediaGate
from bridge.http.transactions import AppserviceAPI
from bridge.matrix import (
    AdminAPI,
    HomeserverUnreachable,
    make_client,
    register_bot,
    wait_for_homeserver,
)
from bridge.pipeline import management, retroactive
from bridge.pipeline.enforcement import RoomEnforcer
from bridge.pipeline.enrollment import AutoEnroller, PowerObtainer
from bridge.pipeline.executor import Executor, RateLimiter, RoomEnforcement
from bridge.pipeline.live_policy import LivePolicy
from bridge.pipeline.management import ManagementRoom
from bridge.pipeline.media_checks import MediaChecker
from bridge.pipeline.notices import SenderNotices
from bridge.pipeline.ping import AppservicePing
from bridge.pipeline.redelivery import RedeliveryNudger
from bridge.pipeline.reload import Reloader, load_runtime_policy
from bridge.pipeline.replicas import (
    CONFIG_TOPIC,
    WAKE_TOPIC,
    LeaderWaker,
    ReplicaHooks,
    ReplicaSync,
    broadcast_key,
)
from bridge.pipeline.retention_preview import count_expiring
from bridge.pipeline.rollout import policy_fingerprint, rollout_if_policy_changed
from bridge.pipeline.sweeper import RetentionSweeper
from bridge.pipeline.to_device import ToDeviceBacklog, to_device_part
from bridge.pipeline.worker import Worker
from bridge.policy.engine import PolicyEngine
from bridge.policy.model import Finding
from bridge.policy.overrides import OverrideBook
from bridge.scheduler import Scheduler, TaskKind, in_leader_task
from bridge.store import AuditEntry, Backend, NewAction, Store, StoreUnavailable
from bridge.store.changes import ChangeFeed, publish
from bridge.store.lease import Lease, Role
from bridge.store.notice_rooms import OVERRIDES_KEY, load_overrides
from bridge.store.process_lock import SqliteProcessLock

log = logging.getLogger(__name__)
#: aiohttp's read buffer for the appservice listener (it pauses reading at twice this).
READ_BUFSIZE = 1024 * 1024

SHUTDOWN_STEP = 10.0  # seconds each shutdown step may take


class Bridge:
    """One running bridge: builds the parts, starts and stops them.

    It is also the object handed to the worker, command handlers and retroactive scans as
    their services; it satisfies the seams they declare (:mod:`bridge.pipeline.services`,
    :class:`bridge.pipeline.retroactive.RetroServices`).
    """

    def __init__(self, config: Config, config_path: Path | None = None) -> None:
        self.config = config
        self.config_path = config_path
        self.started_monotonic = time.monotonic()
        self.version = __version__
        self.ready = False
        self.accepting = True
        self.exit_code = 0
        self.policy = LivePolicy(config)
        self.registry = build_registry()
        self._stop = asyncio.Event()
        self.scheduler = Scheduler(on_critical_death=lambda _name, _exc: self.request_stop(1))
        self.management = ManagementRoom(self._submit, self.scheduler)
        # Overrides with justification: consumed by the gate, granted by commands; every
        # change is stored in the background (in order, the latest state each time).
        self.overrides = OverrideBook(on_change=self._overrides_changed)
        self._overrides_lock = asyncio.Lock()
        self.store: Store
        self.session: ClientSession
        self.worker: Worker
        self.media_checker: MediaChecker
        self.redelivery: RedeliveryNudger
        self.runner: web.AppRunner | None = None
        self.metrics_runner: web.AppRunner | None = None
        self.console_runner: web.AppRunner | None = None
        self.gate: Gate | None = None
        self.crypto: RoomCrypto | None = None  # the bot's E2EE device (e2ee.enabled, leader)
        self._e2ee_failed = False
        # Replicas (see _setup_replicas): None on SQLite, where this process is the leader
        # and holds the database's lock file.
        self.lease: Lease | None = None
        self.changes: ChangeFeed | None = None
        self.replica_sync: ReplicaSync | None = None
        self.sqlite_lock: SqliteProcessLock | None = None
        self.waker = LeaderWaker(lambda: self._announce(WAKE_TOPIC))
        # Attachment scanning (issue 12): extraction processes shared by the upload gate
        # and the in-room re-check; started in open(), stopped in close().
        self.extraction = ExtractionPool(
            config.attachments.workers, config.attachments.limits.memory_bytes
        )

    @property
    def management_room(self) -> str:
        """The management room's ID ("" until known)."""
        return self.management.room_id

    @property
    def role(self) -> Role:
        """Leader (runs the worker, executor, sweepers, jobs) or follower (gate and ingest)."""
        return Role.LEADER if self.lease is None else self.lease.role

    def _overrides_changed(self) -> None:
        self.scheduler.spawn(self._save_overrides(), "save-overrides", TaskKind.ONE_OFF)

    async def _save_overrides(self) -> None:
        async def combine(stored: str | None) -> str:
            self.overrides.merge(stored)  # what other replicas granted or used meanwhile
            return self.overrides.dumps(time.time())

        async with self._overrides_lock:
            await self.store.state.merge(OVERRIDES_KEY, combine)

    async def _submit(self, actions: list[NewAction]) -> None:
        # Bound late: the management room is built before the executor it posts through.
        await self.executor.submit(actions)
        self._wake_leader()

    def _wake_leader(self) -> None:
        """A follower queued work: wake the leader's worker and executor."""
        if self.lease is not None and self.role is Role.FOLLOWER:
            self.waker.poke()

    def _committed(self) -> None:
        self.worker.wake()
        self._wake_leader()

    # -- building -----------------------------------------------------------------------

    def build_web(self) -> web.Application:
        """The aiohttp application with every route the bridge serves."""
        app = web.Application(client_max_size=self.config.appservice.max_body_size)
        self.sink = AuditSink(self.store)
        self.management.sender_notices = SenderNotices(
            self.store,
            self._submit,
            self.sink.submit,
            self.scheduler,
            lambda: self.config.notices,
            self.config.homeserver.domain,
            self.config.bot_mxid,
            lambda: self.config.bridge.command_prefix,
        )
        self.appservice_api = AppserviceAPI(
            self.store,
            self.config.appservice.hs_token,
            allow_query_token=self.config.appservice.allow_query_token,
            on_committed=self._committed,
            accepting=lambda: self.accepting,
            on_refused=self.redelivery.refused,
            on_ephemeral=self._e2ee_received if self.config.e2ee.enabled else None,
        )
        gate = self.gate = Gate(
            self.config.gate.base_path,
            self.config.gate.token,
            lambda: self.policy.engine,
            self.sink,
            on_blocked=self.management.gate_blocked,
            overrides=self.overrides,
        )
        app.add_routes(self.appservice_api.routes())
        # attachments: before the gate's catch-all {callback} route
        app.add_routes(self._media_gate().routes())
        app.add_routes(gate.routes())
        app.add_routes(
            health_routes(
                lambda: self.ready,
                HealthInfo(
                    self.version,
                    self.started_monotonic,
                    self.store.db.backend,
                    role=lambda: str(self.role),
                ),
            )
        )
        app.add_routes(main_listener_metrics(self.config.metrics))
        console = self.config.console  # the compliance console, under its path (issue 15)
        if console.enabled and console.listen is None:
            app.add_subapp(console.path, build_console(self, console.path))
        return app

    def _media_gate(self) -> MediaGate:
        """The attachment gate; its management-room lines go through the executor."""

        def notify(text: str) -> None:
            self.scheduler.spawn(
                self.management.notify(Reply.plain(text)), "media-notice", TaskKind.ONE_OFF
            )

        return MediaGate(
            self.config.gate.base_path,
            self.config.gate.token,
            lambda: self.config.attachments,
            lambda: self.policy.engine,
            self.extraction,
            self.sink,
            notify=notify,
            uploader_refused=self._upload_refused,
        )

    def _upload_refused(self, user_id: str, ref: str, finding: Finding, label: str) -> None:
        """The attachment gate refused a local user's upload: a policy notice tells them."""
        if self.management.sender_notices is not None:
            self.management.sender_notices.upload_refused(user_id, ref, finding, label)

    async def open(self) -> None:
        """Open the store and start listening. Raises StoreUnavailable / OSError."""
        from bridge.archive.setup import open_store

        cfg = self.config
        self._lock_sqlite_file()
        # the encrypted audit store: keyring + checkpoint signing key from `audit:`
        self.store = await open_store(cfg)
        self.to_device_backlog = ToDeviceBacklog(self.store)  # until the E2EE device is open
        self.overrides.load(await load_overrides(self.store))
        self._setup_replicas()
        self.session = ClientSession(timeout=ClientTimeout(total=60))
        self.client = make_client(
            cfg.homeserver.url, cfg.appservice.as_token, cfg.bot_mxid, self.session
        )
        self.admin = (
            AdminAPI(cfg.homeserver.url, cfg.homeserver.admin_token, self.session)
            if cfg.homeserver.admin_token
            else None
        )
        self.ping = AppservicePing(
            self.client, cfg.appservice.id, cfg.appservice.address, self.scheduler
        )
        self.rooms = RoomEnforcer(
            self.store,
            lambda: self.config.federation.rollout_rate,
            self.management.notify,
            own_server=cfg.homeserver.domain,
            bot=cfg.bot_mxid,
            submit=self._submit,
            command_prefix=cfg.bridge.command_prefix,
            scheduler=self.scheduler,
        )
        await self.rooms.load()
        power = PowerObtainer(
            self.rooms,
            self._submit,
            cfg.bot_mxid,
            allowed=lambda: self.admin is not None and self.config.bridge.obtain_power,
        )
        self.executor = Executor(
            self.store,
            self.client,
            cfg.executor,
            self.admin,
            on_permanent_failure=self.management.report_failure,
            rooms=RoomEnforcement(
                plan=lambda room, state: self.policy.engine.plan_room(room, state),
                on_state=self.rooms.on_state,
                on_result=power.on_result,
            ),
        )
        self.worker = Worker(
            self.store,
            lambda: self.config,
            lambda: self.policy.engine,
            self.registry,
            self,
            on_actions=self.executor.wake,
            on_media=lambda: self.media_checker.wake(),
        )
        # attachments: in-room media checks (queue filled by the worker, run as a task)
        self.media_checker = MediaChecker(
            self.store,
            self.session,
            lambda: self.config,
            lambda: self.policy.engine,
            self.extraction,
            lambda: self.management_room,
            on_actions=self.executor.wake,
        )
        await self.worker.load()
        await load_runtime_policy(self.store, self.policy)
        self.sweeper = RetentionSweeper(
            self.store,
            lambda: self.policy.engine,
            lambda: self.config,
            purge=lambda: self.executor.admin is not None,
            management_room=lambda: self.management_room,
            on_actions=self.executor.wake,
        )
        await self.sweeper.load()
        self.redelivery = RedeliveryNudger(self.store.db.reachable, self.ping.until_reached)
        self.reloader = Reloader(
            self.config_path,
            config=lambda: self.config,
            policy=lambda: self.policy,
            management_room=lambda: self.management_room,
            install=self._install,
            audit=self.sink_append,
            rollout=self._rollout_if_policy_changed,
            notify=self.management.notify,
        )
        self.management.room_id = await management.known_room(
            self.store, cfg.bridge.management_room
        )
        self.runner = web.AppRunner(
            self.build_web(),
            access_log=None,
            handle_signals=False,
            shutdown_timeout=SHUTDOWN_STEP,
            # A file the module streams arrives without the reader pausing the socket every
            # 128 KiB (aiohttp's default buffer is 64 KiB); at most 2 MiB buffered per call.
            read_bufsize=READ_BUFSIZE,
        )
        await self.runner.setup()
        if cfg.attachments.enabled:
            await self.extraction.start()
        site = web.TCPSite(self.runner, cfg.appservice.hostname, cfg.appservice.port)
        await site.start()
        self.scheduler.spawn(self.sink.run(), "audit-sink")
        self.metrics_runner = await start_metrics_listener(cfg.metrics)
        if cfg.console.enabled and cfg.console.listen is not None:  # the console's own listener
            self.console_runner = web.AppRunner(build_console(self, ""), access_log=None)
            await self.console_runner.setup()
            await web.TCPSite(self.console_runner, *cfg.console.listen).start()
        self.scheduler.spawn(refresh_gauges(self.store), "metrics")
        log.info(
            "listening on %s:%d (database: %s)",
            cfg.appservice.hostname,
            cfg.appservice.port,
            self.store.db.backend,
        )

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
        if self.lease is None:  # SQLite: this process is the leader, at once
            await self._lead()
        else:  # a follower until the lease says otherwise; the gate needs the room now
            self._set_management_room(self.management.room_id)
        await self.ping.at_startup()
        self.scheduler.spawn(self.redelivery.run(), "redelivery")
        if self.lease is not None and self.changes is not None:
            self.scheduler.spawn(self.changes.run(), "change-feed")
            self.scheduler.spawn(self.lease.run(self._elected, self._deposed), "leader-lease")
        self.ready = True
        log.info(
            "bridge ready (bot %s, management room %s, %s)",
            cfg.bot_mxid,
            self.management_room or "not known yet",
            self.role,
        )

    # -- replicas -------------------------------------------------------------------------

    def _lock_sqlite_file(self) -> None:
        """SQLite: refuse to run next to another bridge process on the same file."""
        url = make_url(self.config.database.url)
        if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
            self.sqlite_lock = SqliteProcessLock(Path(url.database))
            self.sqlite_lock.acquire()

    def _setup_replicas(self) -> None:
        """PostgreSQL: the leader lease, its fence on the leader's writes, and the change
        notices that keep every replica's gate up to date."""
        if self.store.db.backend is not Backend.POSTGRESQL:
            return
        lease = self.lease = Lease(self.store.db)

        async def fence(conn: AsyncConnection) -> None:
            if in_leader_task():
                await lease.fence(conn)

        self.store.db.fence = fence
        self.store.state.broadcast = broadcast_key
        self.replica_sync = ReplicaSync(
            self.store,
            ReplicaHooks(
                policy=lambda: self.policy,
                overrides=self.overrides,
                set_management_room=self._set_management_room,
                reload_config=lambda: self.reloader.reload("another replica"),
                wake=self._wake_local,
            ),
            self.config.bridge.management_room,
        )
        self.changes = ChangeFeed(self.store.db.url, self.replica_sync.on_change)
        for role in Role:
            metrics.REPLICA_ROLE.labels(str(role)).set_function(self._role_is(role))

    def _role_is(self, role: Role) -> Callable[[], float]:
        return lambda: 1.0 if self.role is role else 0.0

    def _wake_local(self) -> None:
        self.worker.wake()
        self.executor.wake()

    def _set_management_room(self, room: str) -> None:
        if room and room != self.policy.management_room:
            self.management.room_id = room
            self.policy.set_management_room(room)

    async def _elected(self, epoch: int) -> None:
        self.scheduler.spawn_leader(self._lead(reload=True), "leader-start")

    async def _deposed(self) -> None:
        await self.scheduler.stop_leader(SHUTDOWN_STEP)
        if self.crypto is not None:  # the next leader opens the bot's device
            crypto, self.crypto = self.crypto, None
            self.worker.decryption.crypto = None
            self.executor.crypto = None
            await crypto.close()

    async def _announce(self, topic: str) -> None:
        """Tell the other replicas (PostgreSQL) that ``topic`` changed."""
        if self.lease is not None:
            async with self.store.db.transaction() as conn:
                await publish(conn, self.store.db.backend, topic)

    async def _lead(self, reload: bool = False) -> None:
        """Become the leader: start the work that runs once across replicas.

        ``reload``: a replica taking over re-reads first what the previous leader changed
        (rooms, commands awaiting confirmation, sweep counters, policy, overrides).
        """
        cfg = self.config
        if reload:
            await self.worker.load()
            await self.sweeper.load()
            await self.rooms.load()
            if self.replica_sync is not None:
                await self.replica_sync.on_change("*")
        room = await management.bootstrap(self.client, self.store, cfg.bridge)
        self._set_management_room(room)
        self.worker.tracker.joined_rooms.add(room)  # bootstrap() stored it joined
        if cfg.e2ee.enabled and self.crypto is None:
            # One device for the bot: only the leader holds it open (docs/e2ee.md, replicas).
            await self._open_e2ee()
            await self._replay_to_device()
        await self._rollout_if_policy_changed()
        spawn = self.scheduler.spawn_leader
        spawn(self.worker.run(), "worker")
        spawn(self.executor.run(), "executor")
        if cfg.attachments.enabled:
            spawn(self.media_checker.run(), "media-checks")
        resumed = await retroactive.resume(self)
        if resumed:
            log.info("resumed %d unfinished retroactive DLP scan(s)", resumed)
        spawn(self.sweeper.run(), "retention-sweeper")
        interval = audit_config(cfg).checkpoint_interval_s
        signer = CheckpointSigner(self.store.records, interval)
        spawn(signer.run(), "audit-checkpoints")  # no record unsigned longer
        spawn(  # archive expiry, checkpoint notices
            run_audit_jobs(
                cfg,
                self.store,
                self._submit,
                lambda: self.management_room,
                self.scheduler,
            ),
            "audit-jobs",
        )
        if cfg.bridge.auto_enroll and self.admin is not None:
            enroller = AutoEnroller(
                self.admin, self.store, self._submit, self.management.notify, cfg.bot_mxid
            )
            spawn(enroller.run(), "auto-enroll", TaskKind.ONE_OFF)
        log.info("leader work started (management room %s)", self.management_room)

    async def _e2ee_received(self, payload: Mapping[str, Any]) -> None:
        """A transaction's to-device part: to the bot's device, or kept in the store until
        the device is open (never refused: Synapse does not resend it; pipeline/to_device)."""
        part = to_device_part(payload)
        if not part:
            return
        if self.crypto is None:
            if self._e2ee_failed:
                return  # logged at start; transactions must not be refused for it
            await self.to_device_backlog.keep(part)
            return
        if await self.crypto.receive(part):
            self.worker.decryption.keys_arrived()
            self.worker.wake()

    async def _replay_to_device(self) -> None:
        """Hand the device what arrived for it before it was open, oldest first."""
        if self.crypto is None:
            return
        parts = await self.to_device_backlog.parts()
        arrived = False
        for part in parts:
            arrived = await self.crypto.receive(part) or arrived
        if parts:
            await self.to_device_backlog.forget(len(parts))
            log.info("E2EE: handed the device %d to-device part(s) kept before it opened",
                     len(parts))  # fmt: skip
        if arrived:
            self.worker.decryption.keys_arrived()
            self.worker.wake()

    async def _open_e2ee(self) -> None:
        """Open the bot's E2EE device and start its sync loop (docs/e2ee.md). A failure is
        logged and the bridge runs on without decrypting (encrypted events stay archived
        as ciphertext and are reported undecryptable)."""
        from bridge.e2ee.olm import OlmCrypto, OlmSettings, Secrets, crypto_db_url
        from bridge.e2ee.pickle_key import derive_pickle_key

        cfg = self.config
        op_key = await self.store.keys.op_key_created()
        settings = OlmSettings(
            homeserver_url=cfg.homeserver.url,
            as_token=cfg.appservice.as_token,
            bot_mxid=cfg.bot_mxid,
            crypto_db_url=crypto_db_url(
                self.store.db.engine.url.render_as_string(hide_password=False)
            ),
            pickle_key=derive_pickle_key(op_key.key, cfg.bot_mxid),
            device_name=cfg.e2ee.device_name,
        )
        try:
            crypto = await OlmCrypto.open(
                settings, self.session, Secrets(self.store.state.get, self.store.state.set)
            )
        except Exception:
            log.exception("could not open the bot's E2EE device; encrypted rooms stay unread")
            self._e2ee_failed = True
            return
        self.crypto = crypto
        self.worker.decryption.crypto = crypto
        self.executor.crypto = crypto
        log.info("E2EE device %s ready", crypto.device_id)

    async def _rollout_if_policy_changed(self) -> None:
        """After a restart or reload with a changed config, bring every managed room in line."""
        if self.role is not Role.LEADER:
            return  # the leader rolls out (a follower reloading its config follows it)
        await rollout_if_policy_changed(
            self.store,
            self.rooms,
            policy_fingerprint(self.config, self.policy.runtime),
            self.management_room,
            self.executor.wake,
        )

    def _install(self, config: Config, policy: LivePolicy) -> None:
        """Put a reloaded config and policy in force everywhere they are read."""
        self.config = config
        self.policy = policy
        self.executor.config = config.executor
        self.executor.limiter = RateLimiter(config.executor.rate_per_second)

    # -- services (what commands call) -------------------------------------------------

    async def reload(self, who: str) -> tuple[bool, list[str]]:
        """Re-read the config file (see :class:`bridge.pipeline.reload.Reloader`); every
        other replica then re-reads its own."""
        result = await self.reloader.reload(who)
        if result[0]:
            await self._announce(CONFIG_TOPIC)
        return result

    def undecryptable_counts(self) -> Mapping[str, int]:
        """End-to-end encrypted events still undecryptable, by room."""
        return self.worker.decryption.counts()

    async def count_expiring(self, scope: str, ms: int) -> tuple[int, int]:
        """(messages, rooms) a retention of ``ms`` at ``scope`` would delete that the
        policy in force would not yet (for the confirmation of ``retention set``)."""
        return await count_expiring(self.policy, self.sweeper, scope, ms)

    def start_retroactive_scan(self, engine: PolicyEngine, scan: RetroScan) -> None:
        """Scan the archive for a new DLP rule in the background (``--retroactive``)."""
        retroactive.start(self, engine, retroactive.RetroJob.from_scan(scan))

    async def verify_archive(self, earlier_keys: Sequence[Ed25519PublicKey]) -> VerifyReport:
        """Check the archive's chain and checkpoints (``audit verify`` in Matrix)."""
        return await verify_store(
            self.store.db.engine,
            [self.store.signing_key.public_key(), *earlier_keys],
            audit_config(self.config).checkpoint_log,
        )

    async def sink_append(self, entry: AuditEntry) -> None:
        """Record an audit entry now if possible, else through the background sink."""
        try:
            await self.store.records.append([entry])
        except StoreUnavailable:
            self.sink.submit(entry)

    # -- running ------------------------------------------------------------------------

    def request_stop(self, code: int = 0) -> None:
        """Stop the bridge; the process exits with ``code`` unless one was set before."""
        self.exit_code = self.exit_code or code
        self._stop.set()

    async def run(self) -> int:
        """Open, start, serve until a stop signal; returns the process exit code."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        loop.add_signal_handler(
            signal.SIGHUP,
            lambda: self.scheduler.spawn(self._sighup(), "reload", TaskKind.ONE_OFF),
        )
        await self.open()
        try:
            startup = asyncio.create_task(self.startup())
            stop = asyncio.create_task(self._stop.wait())
            done, _ = await asyncio.wait({startup, stop}, return_when=asyncio.FIRST_COMPLETED)
            if startup in done:
                stop.cancel()
                startup.result()  # raises HomeserverUnreachable etc.
                await self._stop.wait()
            else:
                startup.cancel()
                await asyncio.wait({startup}, timeout=SHUTDOWN_STEP)
        finally:
            await self.close()
        return self.exit_code

    async def _sighup(self) -> None:
        await self.reloader.reload_and_report("SIGHUP")
        await self._announce(CONFIG_TOPIC)

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
        if self.metrics_runner is not None:
            await self.metrics_runner.cleanup()
        if self.console_runner is not None:
            await self.console_runner.cleanup()
        await self.scheduler.stop(SHUTDOWN_STEP)
        if self.gate is not None:
            self.gate.close()  # its judging threads
        self.extraction.close()  # the attachment extraction processes
        try:  # membership changes not yet written (for the federation confirmation counts)
            await asyncio.wait_for(self.rooms.close(), SHUTDOWN_STEP)
        except Exception as e:
            log.warning("could not store the last membership changes: %r", e)
        try:
            await asyncio.wait_for(self.sink.flush(), SHUTDOWN_STEP)
        except Exception as e:
            log.warning("could not write %d buffered audit records: %s", self.sink.pending, e)
        if self.crypto is not None:
            await self.crypto.close()
        await self.session.close()
        if self.lease is not None:  # after the last leader writes; a follower takes over now
            try:
                await asyncio.wait_for(self.lease.release(), SHUTDOWN_STEP)
            except TimeoutError:
                log.warning("could not release the leader lease; it expires on its own")
        try:
            # Signs the final checkpoint; bounded in case the database hangs.
            await asyncio.wait_for(self.store.close(), SHUTDOWN_STEP)
        except Exception as e:
            log.warning("closing the store failed: %s", e.__class__.__name__)
        if self.sqlite_lock is not None:
            self.sqlite_lock.release()
        log.info("bridge stopped")


__all__ = ["Bridge", "HomeserverUnreachable", "build_registry"]
