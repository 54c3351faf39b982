"""Self-service commands of a blocked sender in their policy-notice room, and the stats.

``report REF [COMMENT]``: the sender thinks refusal ``REF`` was a mistake; the management
room is told the rule, the room, the sender, the masked excerpt and the comment. Reports
are counted per rule (kept in the store; also a metric) and shown by ``dlp stats``.
"""

from __future__ import annotations

import json

from bridge import metrics
from bridge.commands.context import CommandContext
from bridge.commands.errors import CommandError
from bridge.commands.exceptions import DISMISSED, EXCEPTION, REPORTED_PREFIX, report_outcomes
from bridge.commands.registry import Arg, CommandGroup
from bridge.commands.replies import Reply
from bridge.commands.roles import Role
from bridge.policy.notices import Ledger, normalize_ref, text, when
from bridge.store import NewAction
from bridge.store.notice_rooms import load_ledger

commands = CommandGroup()

#: ``bridge_state`` key of the reports per rule (JSON: rule -> count).
REPORTS_KEY = "notices.reports"
#: The executor's stored kind of a notice (commands do not import the pipeline).
_SEND_NOTICE = "send_notice"


async def _report_counts(ctx: CommandContext) -> dict[str, int]:
    raw = ctx.state_updates.get(REPORTS_KEY) or await ctx.services.store.state.get(REPORTS_KEY)
    try:
        counts = json.loads(raw) if raw else {}
    except ValueError:
        counts = {}
    return {str(k): int(v) for k, v in counts.items()} if isinstance(counts, dict) else {}


@commands.command(
    "report",
    summary="tell the compliance team that refusal REF was a mistake (in your notice room)",
    role=Role.AUDITOR,  # not checked: self-service, see dispatch
    args=(Arg("ref", "the reference in the notice"), Arg("comment", required=False, rest=True)),
    notice_room=True,
)
async def report(ctx: CommandContext) -> Reply:
    """Send the management room the refusal's rule, room, sender, masked excerpt and comment."""
    ref = normalize_ref(ctx.args["ref"])
    lang = ctx.services.config.notices.languages.for_user(ctx.sender)
    ledger = Ledger.loads(await load_ledger(ctx.services.store, ctx.sender))
    refusal = ledger.find(ref)
    if refusal is None:
        raise CommandError(text(lang, "unknown_ref", ref=ref))
    reported_key = REPORTED_PREFIX + ref
    if await ctx.services.store.state.get(reported_key):
        raise CommandError(text(lang, "already_reported", ref=ref))
    ctx.state_updates[reported_key] = refusal.rule  # read when the report is answered
    comment = str(ctx.args.get("comment") or "").strip()
    mgmt = ctx.services.management_room
    if not mgmt:
        raise CommandError(text(lang, "unreachable"))
    # An upload has no room yet (it was judged by the global rules).
    room = refusal.room_id or "(none: judged by the global rules)"
    room_option = f" [--room {refusal.room_id}]" if refusal.room_id else ""
    what = f"{refusal.subject} ({refusal.file})" if refusal.file else str(refusal.subject)
    lines = [
        f"📣 False-positive report {ref} from {ctx.sender}",
        f"rule: {refusal.rule}",
        f"room: {room}",
        f"refused: their {what} at {when(refusal.at)}",
        f"excerpt (masked): {refusal.excerpt or '(none)'}",
        f"comment: {comment or '(none)'}",
        f'answer: !policy dlp except {refusal.rule} "<allowed phrase>" --report {ref}'
        f"{room_option}, or !policy dlp dismiss {ref}",
    ]
    told = Reply.lines(lines[0], lines[1:])
    ctx.actions.append(NewAction(_SEND_NOTICE, {"body": told.text, "html": told.html}, mgmt))
    counts = await _report_counts(ctx)
    counts[refusal.rule] = counts.get(refusal.rule, 0) + 1
    ctx.state_updates[REPORTS_KEY] = json.dumps(counts, sort_keys=True)
    ctx.after_commit.append(metrics.DLP_REPORTS.labels(refusal.rule).inc)
    ctx.audit.update(
        {"ref": ref, "rule": refusal.rule, "about_room": refusal.room_id, "comment": comment}
    )
    return Reply.plain(text(lang, "report_sent", ref=ref))


def _gate_refusals() -> dict[str, int]:
    """Refusals per rule at the gate since the bridge started (from the metrics)."""
    out: dict[str, int] = {}
    for family in metrics.DLP_HITS.collect():
        for sample in family.samples:
            if sample.name.endswith("_total") and sample.labels.get("path") == "gate":
                out[sample.labels["rule"]] = int(sample.value)
    return out


@commands.command(
    "dlp",
    "stats",
    summary="false-positive reports per rule (kept), and gate hits per rule since start",
    role=Role.AUDITOR,
)
async def stats(ctx: CommandContext) -> Reply:
    """Reports per rule, noisiest first, with the gate's hits since start."""
    reports = await _report_counts(ctx)
    outcomes = await report_outcomes(ctx)
    hits = _gate_refusals()
    rules = sorted(set(reports) | set(hits), key=lambda r: (-reports.get(r, 0), r))
    items = []
    for r in rules:
        done = outcomes.get(r, {})
        answered = (
            f" ({done.get(EXCEPTION, 0)} answered with an exception,"
            f" {done.get(DISMISSED, 0)} dismissed)"
            if done
            else ""
        )
        items.append(f"{r}: {reports.get(r, 0)} reports{answered}, {hits.get(r, 0)} gate hits")
    return Reply.lines("DLP rule stats" + ("" if items else ": no reports or hits yet"), items)
