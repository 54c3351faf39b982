"""Answering false-positive reports: ``!policy dlp except``, ``remove-exception``,
``exceptions`` and ``dismiss``.

An exception is an allowed phrase for one rule at a scope (globally, the room the command
is typed in, or ``--room`` a room ID, typically the reported room): a match of that rule
lying entirely inside the phrase is no longer flagged (see
:mod:`bridge.policy.dlp.engine`). It is kept in the runtime DLP document like the other
rules added by command, and staged, audited and swapped in the same way
(:func:`bridge.commands.dlp.stage_change`). ``--report REF`` ties it to a report, whose
outcome (an exception, or ``dismiss``) is counted per rule for ``!policy dlp stats``.
"""

from __future__ import annotations

import json
import re

from bridge.commands.context import CommandContext
from bridge.commands.dlp import stage_change
from bridge.commands.errors import CommandError
from bridge.commands.registry import Arg, CommandGroup, Flag
from bridge.commands.replies import Reply
from bridge.commands.roles import Role
from bridge.commands.scope import SCOPE_FLAG, scope_of, where
from bridge.policy import layers
from bridge.policy.dlp import AllowedPhrase
from bridge.policy.notices import normalize_ref

commands = CommandGroup()

#: ``bridge_state`` key prefix of a reported reference (its value: the rule).
REPORTED_PREFIX = "notices.reported."
#: ``bridge_state`` key prefix of a report's outcome (``exception`` or ``dismissed``).
RESOLVED_PREFIX = "notices.resolved."
#: ``bridge_state`` key of the outcomes per rule (JSON: rule -> {outcome: count}).
OUTCOMES_KEY = "notices.report_outcomes"
EXCEPTION, DISMISSED = "exception", "dismissed"

ROOM_FLAG = Flag("room", "the room the exception applies in (instead of --scope)", value="ROOM")
REPORT_FLAG = Flag("report", "the false-positive report this answers", value="REF")


async def report_outcomes(ctx: CommandContext) -> dict[str, dict[str, int]]:
    """Outcomes of reports per rule (staged ones included)."""
    raw = ctx.state_updates.get(OUTCOMES_KEY) or await ctx.services.store.state.get(OUTCOMES_KEY)
    try:
        data = json.loads(raw) if raw else {}
    except ValueError:
        data = {}
    if not isinstance(data, dict):
        return {}
    return {
        str(rule): {str(k): int(v) for k, v in counts.items()}
        for rule, counts in data.items()
        if isinstance(counts, dict)
    }


async def _resolve(ctx: CommandContext, ref: str, outcome: str, rule: str | None) -> str:
    """Stage ``outcome`` for report ``ref``; returns the report's rule."""
    ref = normalize_ref(ref)
    reported = await ctx.services.store.state.get(REPORTED_PREFIX + ref)
    if not reported:
        raise CommandError(f"there is no false-positive report {ref}.")
    if await ctx.services.store.state.get(RESOLVED_PREFIX + ref):
        raise CommandError(f"report {ref} was already answered.")
    # Reports made before outcomes were tracked stored "1" instead of their rule.
    report_rule = reported if ":" in reported else (rule or "unknown")
    if rule is not None and report_rule != rule:
        raise CommandError(f"report {ref} is about {report_rule}, not {rule}.")
    ctx.state_updates[RESOLVED_PREFIX + ref] = outcome
    outcomes = await report_outcomes(ctx)
    counts = outcomes.setdefault(report_rule, {})
    counts[outcome] = counts.get(outcome, 0) + 1
    ctx.state_updates[OUTCOMES_KEY] = json.dumps(outcomes, sort_keys=True)
    ctx.audit.update({"report": ref, "outcome": outcome, "rule": report_rule})
    return report_rule


def _audited(ctx: CommandContext, phrase: str) -> None:
    """The phrase goes into the audit record with its digits starred (it may hold a test
    card number, which should not be copied around); the runtime rules keep it whole."""
    ctx.args.pop("phrase", None)
    ctx.audit["phrase"] = re.sub(r"[0-9]", "*", phrase)


def _scope(ctx: CommandContext) -> str:
    room = ctx.flags.get("room")
    if room is None:
        return scope_of(ctx)
    if "scope" in ctx.flags:
        raise CommandError("give either --scope or --room, not both")
    if not str(room).startswith("!"):
        raise CommandError(f"--room expects a room ID (!…), not {room}")
    return str(room)


def _rule_and_phrase(ctx: CommandContext) -> tuple[str, str]:
    rule, phrase = ctx.args["rule"].strip(), ctx.args["phrase"].strip()
    try:
        AllowedPhrase(rule, phrase)
    except ValueError as e:
        raise CommandError(str(e)) from None
    return rule, phrase


@commands.command(
    "dlp",
    "except",
    summary='allow "a phrase" for one rule: its matches inside the phrase pass',
    args=(
        Arg("rule", "the rule, as in the report (detector:card, keyword:LIST, regex:NAME)"),
        Arg("phrase", "the allowed phrase, in quotes", rest=True),
    ),
    flags=(SCOPE_FLAG, ROOM_FLAG, REPORT_FLAG),
    room_scoped=True,
)
async def add_exception(ctx: CommandContext) -> Reply:
    """Add an allowed phrase for a rule at a scope, optionally answering a report."""
    rule, phrase = _rule_and_phrase(ctx)
    scope = _scope(ctx)
    report = normalize_ref(str(ctx.flags["report"])) if ctx.flags.get("report") else None
    doc, added = layers.add_allowed_phrase(
        ctx.services.policy.runtime_dlp, scope, rule, phrase, report
    )
    if not added:
        raise CommandError(f"{rule} already allows that phrase {where(scope)}")
    if report is not None:
        await _resolve(ctx, report, EXCEPTION, rule)
    label = where(scope, ctx)
    stage_change(ctx, doc, f"allow a phrase for {rule} {label}")
    _audited(ctx, phrase)
    answered = f" (report {report} answered)" if report else ""
    return Reply.plain(
        f"✅ exception added {label}: {rule} no longer flags matches inside that phrase"
        f"{answered}. Matches elsewhere in a message still count."
    )


@commands.command(
    "dlp",
    "remove-exception",
    summary="remove a phrase allowed with dlp except",
    args=(Arg("rule", "the rule"), Arg("phrase", "the phrase, in quotes", rest=True)),
    flags=(SCOPE_FLAG, ROOM_FLAG),
    room_scoped=True,
)
async def remove_exception(ctx: CommandContext) -> Reply:
    """Remove an exception added by command (config ones are changed in the file)."""
    rule, phrase = _rule_and_phrase(ctx)
    scope = _scope(ctx)
    doc, found = layers.remove_allowed_phrase(ctx.services.policy.runtime_dlp, scope, rule, phrase)
    if not found:
        raise CommandError(
            f"no exception of {rule} with that phrase {where(scope)} "
            "(exceptions from config.yaml are changed in that file)"
        )
    stage_change(ctx, doc, f"remove an allowed phrase of {rule} {where(scope)}")
    _audited(ctx, phrase)
    return Reply.plain(f"✅ exception of {rule} removed {where(scope)}")


@commands.command(
    "dlp",
    "exceptions",
    summary="the phrases allowed per rule (added by command)",
    role=Role.AUDITOR,
)
async def list_exceptions(ctx: CommandContext) -> Reply:
    """Every exception added by command: scope, rule, phrase, the report it answered."""
    entries = layers.allowed_phrase_entries(ctx.services.policy.runtime_dlp)
    # Not room-scoped: only in the management room (phrases may hold test card numbers).
    items = [
        f"{where(scope)}: {rule}: “{phrase}”" + (f" (report {report})" if report else "")
        for scope, rule, phrase, report in entries
    ]
    return Reply.lines("DLP exceptions" + ("" if items else ": none"), items)


@commands.command(
    "dlp",
    "dismiss",
    summary="answer a false-positive report: the rule was right, nothing changes",
    args=(Arg("ref", "the report's reference"),),
)
async def dismiss(ctx: CommandContext) -> Reply:
    """Record that a report was looked at and the refusal stands."""
    rule = await _resolve(ctx, ctx.args["ref"], DISMISSED, None)
    return Reply.plain(f"✅ report {normalize_ref(ctx.args['ref'])} on {rule} dismissed")
