"""``!policy hold …`` and ``!policy audit …``: legal hold and the audit archive from Matrix.

Replies are summaries: counts, record kinds, room IDs, event IDs and times, never message
content, so an auditor's search cannot pour other rooms' messages into a chat room (the
``audit search`` / ``audit export`` CLI is the way to read records).

A hold change is committed by :meth:`bridge.store.holds.HoldRepository.set` together with its own
``hold`` audit record (the hold table is not part of the staged command state); the
command's record follows in the worker's commit.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from mautrix.types import RoomAlias

from bridge.audit import tail
from bridge.audit.chain import CHECKPOINT_SIGNATURE, SigningKeyError, load_public_key
from bridge.audit.kinds import AuditKind, split_type_filter
from bridge.commands.context import CommandContext
from bridge.commands.errors import CommandError
from bridge.commands.registry import Arg, CommandGroup, Flag
from bridge.commands.replies import Reply
from bridge.commands.roles import Role
from bridge.policy.durations import parse_instant
from bridge.store.models import SearchGroup

commands = CommandGroup()

LATEST = 5
GROUPS = 15


def _group_label(group: SearchGroup) -> str:
    """What a search group counts: events of a type, decision or gate records with the
    event type they judged, or records of another kind (grouped by room only, so no type:
    a command's type is its name)."""
    if group.kind == AuditKind.EVENT:
        return group.type or "?"
    return f"{group.kind} ({group.type})" if group.type else group.kind


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _ms(value: str | None, flag: str) -> int | None:
    if not value:
        return None
    try:
        return parse_instant(value)
    except ValueError:
        raise CommandError(
            f"--{flag}: {value!r} is not an ISO date/time (e.g. 2025-01-31 or 2025-01-31T08:00:00Z)"
        ) from None


async def _target(ctx: CommandContext) -> tuple[str, str]:
    """(scope, target) of a hold command: a room ID, an alias, a user ID, or this room."""
    raw = (ctx.args.get("target") or ctx.room_id).strip()
    if raw.startswith("@") and ":" in raw:
        return "user", raw
    if raw.startswith("!") and len(raw) > 1:  # room version 12 IDs have no :server
        return "room", raw
    if raw.startswith("#") and ":" in raw:
        try:
            resolved = await ctx.services.client.resolve_room_alias(RoomAlias(raw))
        except Exception as e:
            raise CommandError(f"cannot resolve {raw}: {e}") from None
        return "room", str(resolved.room_id)
    raise CommandError(f"{raw!r} is neither a room (!id, #alias:server) nor a user (@user:server)")


@commands.command(
    "hold",
    "on",
    summary="put a room (default: this one) or a user on legal hold: "
    "archive expiry and retention purges leave it alone",
    args=(Arg("target", "room ID, #alias or @user (default: this room)", required=False),),
    flags=(Flag("reason", "why (kept, encrypted, with the hold)", value="TEXT"),),
    room_scoped=True,
)
async def hold_on(ctx: CommandContext) -> Reply:
    """Put a room or user on legal hold (committed with its own audit record)."""
    scope, target = await _target(ctx)
    reason = ctx.flags.get("reason")
    result = await ctx.services.store.holds.set(scope, target, True, by=ctx.sender, reason=reason)
    ctx.audit.update(hold={"scope": scope, "target": target, "result": result})
    if result == "unchanged":
        return Reply.plain(f"{scope.title()} {target} is already on legal hold.")
    return Reply.plain(
        f"🔒 {scope} {target} is on legal hold: archive expiry and retention purges "
        f"skip it until `hold off`."
    )


@commands.command(
    "hold",
    "off",
    summary="lift a legal hold set with `hold on` (holds from config.yaml stay)",
    args=(Arg("target", "room ID, #alias or @user (default: this room)", required=False),),
    flags=(Flag("reason", "why", value="TEXT"),),
    room_scoped=True,
)
async def hold_off(ctx: CommandContext) -> Reply:
    """Lift a hold set by command; holds from the config stay."""
    scope, target = await _target(ctx)
    result = await ctx.services.store.holds.set(
        scope, target, False, by=ctx.sender, reason=ctx.flags.get("reason")
    )
    ctx.audit.update(hold={"scope": scope, "target": target, "result": result})
    if result == "config":
        raise CommandError(
            f"the legal hold on {target} comes from the configuration "
            f"(audit.legal_hold); remove it there and restart the bridge"
        )
    if result == "unchanged":
        return Reply.plain(f"{scope.title()} {target} is not on legal hold.")
    return Reply.plain(f"🔓 legal hold on {scope} {target} lifted.")


@commands.command("hold", "list", summary="rooms and users on legal hold", role=Role.AUDITOR)
async def hold_list(ctx: CommandContext) -> Reply:
    """Every room and user on legal hold."""
    holds = await ctx.services.store.holds.entries()
    items = []
    for h in holds:
        who = "config.yaml" if h.source == "config" else (h.by or "?")
        line = f"{h.scope} {h.target}: since {_iso(h.set_ts)}, by {who}"
        if h.reason:
            line += f": {h.reason}"
        items.append(line)
    title = f"Legal holds: {len(items)}" if items else "No room or user is on legal hold."
    return Reply.lines(title, items)


@commands.command(
    "audit",
    "verify",
    summary="check the archive's hash chain and signed checkpoints",
    role=Role.AUDITOR,
)
async def audit_verify(ctx: CommandContext) -> Reply:
    """Verify the hash chain and the signed checkpoints, trusting the current signing key
    and ``audit.previous_public_keys``; report the unsigned tail after the signed head (⚠️
    when a record has been unsigned longer than ``audit.checkpoint_interval`` + margin)."""
    svc = ctx.services
    started = time.monotonic()
    previous = svc.config.audit_settings().previous_public_keys
    try:
        earlier = [load_public_key(p.read_bytes()) for p in previous]
    except (OSError, SigningKeyError) as e:
        raise CommandError(f"audit.previous_public_keys: {e}") from None
    # streams in batches, so the event loop keeps serving between them
    report = await svc.verify_archive(earlier)
    took = time.monotonic() - started
    ctx.audit.update(
        ok=report.ok,
        records=report.records_checked,
        checkpoints=report.checkpoints_checked,
        first_bad_seq=report.first_bad_seq,
        problem=report.problem_kind,
        signed_seq=report.signed_seq,
        unsigned_records=report.tail_records,
    )
    if report.ok:
        head = report.head_hash.hex() if report.head_hash else "-"
        now = tail.now_ms()
        interval_s = svc.config.audit_settings().checkpoint_interval_s
        stale = tail.stale_tail_problem(report, now, interval_s + tail.TAIL_MARGIN_S)
        lines = [
            f"{report.records_checked} records verified (last seq {report.last_seq})",
            f"{report.checkpoints_checked} signed checkpoints verified",
            tail.signed_head_line(report, now),
            f"{report.records_without_ciphertext} records expired (ciphertext dropped)",
            f"head {head}",
            f"took {took:.1f}s",
        ]
        if stale is None:
            return Reply.lines("✅ Audit archive intact", lines)
        ctx.audit.update(stale_tail=True)
        return Reply.lines(
            "⚠️ Audit archive intact, but its newest records are not signed", [stale, *lines]
        )
    lines = [
        f"first bad record: seq {report.first_bad_seq} ({report.problem_kind})",
        str(report.problem),
        f"{report.records_checked} records verified before it",
        "run `python -m bridge audit verify -c config.yaml` for details",
    ]
    if report.problem_kind == CHECKPOINT_SIGNATURE and "not a trusted" in str(report.problem):
        # this command trusts the current signing key and audit.previous_public_keys
        lines.append(
            "if the signing key was replaced, list the old key's public key under "
            "audit.previous_public_keys in the config (then `!policy reload`), or verify "
            "from the CLI: `python -m bridge audit verify -c config.yaml "
            "--public-key old.pem --public-key new.pem`"
        )
    return Reply.lines("❌ Audit archive BROKEN", lines)


@commands.command(
    "audit",
    "search",
    summary="count matching archive records per room and type, and show the latest "
    "event IDs (no message content)",
    role=Role.AUDITOR,
    flags=(
        Flag("room", "room ID", value="ROOM"),
        Flag("sender", "user ID", value="USER"),
        Flag("type", "event type, or a record kind (" + ", ".join(AuditKind) + ")", "T"),
        Flag("since", "ISO time, inclusive", value="ISO"),
        Flag("until", "ISO time, exclusive", value="ISO"),
    ),
)
async def audit_search(ctx: CommandContext) -> Reply:
    """Count matching records per room and type, with the latest few (no content)."""
    f = ctx.flags
    kind, etype = split_type_filter(f.get("type"))
    filters: dict[str, Any] = {
        "kind": kind,
        "room": f.get("room"),
        "sender": f.get("sender"),
        "type": etype,
        "since": _ms(f.get("since"), "since"),
        "until": _ms(f.get("until"), "until"),
    }
    summary = await ctx.services.store.reader.search_summary(
        **filters, groups=GROUPS, latest=LATEST
    )
    ctx.audit.update(matches=summary.total)
    used = " ".join(f"--{k} {v}" for k, v in f.items() if v) or "(no filter)"
    if not summary.total:
        return Reply.plain(f"No archive records match {used}.")
    items = []
    for g in summary.groups:
        where = g.room_id or ("(no room)" if g.readable else "(room unreadable: expired)")
        items.append(f"{g.count} x {_group_label(g)} in {where} (latest {_iso(g.latest_ts)})")
    if summary.more_groups:
        items.append("… more groups: narrow the search with --room/--type/--since")
    items.append(f"latest {len(summary.latest)}:")
    for m in summary.latest:
        ident = m.event_id or f"{m.kind} record"
        items.append(
            f"#{m.seq} {_iso(m.origin_ts)} {ident}"
            + (f" in {m.room_id}" if m.room_id else "")
            + (f" ({m.type})" if m.type else "")
        )
    return Reply.lines(f"{summary.total} archive records match {used}", items)
