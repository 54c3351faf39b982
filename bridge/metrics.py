"""Prometheus metrics, one registry for the process."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

TRANSACTIONS = Counter(
    "bridge_transactions_total",
    "Appservice transactions received, by result",
    ["result"],
    registry=REGISTRY,
)
EVENTS_INGESTED = Counter(
    "bridge_events_ingested_total", "Events committed to the store", registry=REGISTRY
)
INGEST_LATENCY = Histogram(
    "bridge_ingest_seconds",
    "Time from receiving a transaction to answering it",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
    registry=REGISTRY,
)
QUEUE_DEPTH = Gauge(
    "bridge_queue_depth", "Committed transactions not yet processed", registry=REGISTRY
)
QUEUE_LAG = Gauge(
    "bridge_queue_lag_seconds",
    "Age of the oldest unprocessed transaction",
    registry=REGISTRY,
)
GATE_DECISIONS = Counter(
    "bridge_gate_decisions_total",
    "Gate answers by callback, result and rule",
    ["callback", "result", "rule"],
    registry=REGISTRY,
)
GATE_LATENCY = Histogram(
    "bridge_gate_seconds",
    "Time to answer a gate callback",
    ["callback"],
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.1),
    registry=REGISTRY,
)
DLP_HITS = Counter(
    "bridge_dlp_hits_total",
    "DLP rule matches, by rule and where found (gate, ingest)",
    ["rule", "path"],
    registry=REGISTRY,
)
EXECUTOR_ACTIONS = Counter(
    "bridge_executor_actions_total",
    "Executor attempts by kind and outcome",
    ["kind", "outcome"],
    registry=REGISTRY,
)
RATE_LIMIT_WAITS = Counter(
    "bridge_rate_limit_waits_total",
    "Times the homeserver answered M_LIMIT_EXCEEDED",
    registry=REGISTRY,
)
COMMANDS = Counter(
    "bridge_commands_total",
    "Admin commands by name and outcome",
    ["command", "outcome"],
    registry=REGISTRY,
)
ACTIONS_BACKLOG = Gauge(
    "bridge_executor_backlog", "Executor actions by status", ["status"], registry=REGISTRY
)
AUDIT_RECORDS = Gauge(
    "bridge_audit_records",
    "Records in the audit store (highest sequence number)",
    registry=REGISTRY,
)
CHECKPOINT_AGE = Gauge(
    "bridge_audit_checkpoint_age_seconds", "Age of the last signed checkpoint", registry=REGISTRY
)
UNSIGNED_AGE = Gauge(
    "bridge_audit_unsigned_seconds",
    "How long the oldest record not under a signed checkpoint has been unsigned (0: none)",
    registry=REGISTRY,
)
UNSIGNED_RECORDS = Gauge(
    "bridge_audit_unsigned_records",
    "Records after the last signed checkpoint",
    registry=REGISTRY,
)
RETENTION_ROOMS = Gauge(
    "bridge_retention_rooms",
    "Rooms in the last retention sweep: with a retention limit (limited), not yet caught up"
    " (behind), skipped for legal hold (held)",
    ["state"],
    registry=REGISTRY,
)
RETENTION_REMOVALS = Counter(
    "bridge_retention_removals_total",
    "Removals the retention sweeper queued: redactions (one per event) and purges",
    ["kind"],
    registry=REGISTRY,
)
RETENTION_HOLD_SKIPS = Counter(
    "bridge_retention_hold_skips_total",
    "Times the retention sweeper skipped events or a purge because of a legal hold",
    registry=REGISTRY,
)
RETENTION_LAST_SWEEP = Gauge(
    "bridge_retention_last_sweep_timestamp_seconds",
    "When the retention sweeper last ran (Unix time)",
    registry=REGISTRY,
)
UNREADABLE_EVENTS = Counter(
    "bridge_worker_unreadable_events_total",
    "Archived events the worker could not read back and skipped (ciphertext gone, damaged)",
    registry=REGISTRY,
)

DLP_REPORTS = Counter(
    "bridge_dlp_reports_total",
    "False-positive reports by blocked senders (!policy report), by rule",
    ["rule"],
    registry=REGISTRY,
)

# -- e2ee (issue 14) --------------------------------------------------------------------
E2EE_DECRYPTED = Counter(
    "bridge_e2ee_decrypted_total",
    "End-to-end encrypted events the bot decrypted, by when (at once, or later on a late key)",
    ["when"],
    registry=REGISTRY,
)
E2EE_UNDECRYPTABLE = Counter(
    "bridge_e2ee_undecryptable_total",
    "Encrypted events the bot could not decrypt when it processed them, by reason",
    ["reason"],
    registry=REGISTRY,
)
E2EE_PENDING = Gauge(
    "bridge_e2ee_undecryptable_pending",
    "Encrypted events still undecryptable (kept for retry), by room",
    ["room_id"],
    registry=REGISTRY,
)
REPLICA_ROLE = Gauge(
    "bridge_replica_role",
    "1 for this replica's current role (leader: runs the worker, executor, sweepers and "
    "jobs; follower: answers the gate and ingest only), 0 for the other",
    ["role"],
    registry=REGISTRY,
)

# --- attachments (issue 12) -------------------------------------------------------------
MEDIA_CHECKS = Counter(
    "bridge_media_checks_total",
    "Attachments judged, by where (gate, room), outcome and sniffed type",
    ["path", "outcome", "type"],
    registry=REGISTRY,
)
MEDIA_EXTRACT_SECONDS = Histogram(
    "bridge_media_extract_seconds",
    "Time to read the text of one attachment (in the extraction process), by sniffed type",
    ["type"],
    buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    registry=REGISTRY,
)
MEDIA_CACHE = Counter(
    "bridge_media_cache_total",
    "In-room attachment checks answered from the cache (hit) or by fetching and reading (miss)",
    ["result"],
    registry=REGISTRY,
)
