"""``!policy dlp …``: keyword lists, regexes and detectors, changed and tested from Matrix.

Changes are staged in the runtime policy document, committed with the command's audit
record, and the new engine is swapped in right after the commit, so the gate enforces them
within the next request. ``--scope here`` keys the rule by the room the command was typed
in; when that room is a space, the rule also applies in the rooms of the space.
``--retroactive`` starts a background scan of the archive after the commit
(:meth:`~bridge.commands.services.CommandServices.start_retroactive_scan`).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from bridge.commands.context import CommandContext
from bridge.commands.disclosure import redact_rule_listing, redact_test_result
from bridge.commands.errors import CommandError
from bridge.commands.registry import Arg, CommandGroup, Flag
from bridge.commands.replies import Reply
from bridge.commands.roles import Role
from bridge.commands.scope import SCOPE_FLAG, room_of, scope_of, where
from bridge.commands.services import RetroScan
from bridge.policy import layers
from bridge.policy.dlp import DETECTORS, DlpEngine, DlpPolicy, InvalidPattern, KeywordList
from bridge.policy.durations import DurationError, format_duration, parse_duration
from bridge.policy.model import Action

commands = CommandGroup()

ACTIONS = tuple(a.value for a in Action)
ACTION_FLAG = Flag(
    "action",
    "what a match does: " + ", ".join(ACTIONS) + "; several with commas (default block)",
    value="A[,A…]",
)
RETRO_FLAG = Flag(
    "retroactive", "also apply it to archived messages (then redacts matches of block/redact)"
)
OVERRIDABLE_FLAG = Flag(
    "overridable", "the sender may justify a refusal and resend that message once"
)
NO_NOTIFY_FLAG = Flag("no-notify", "refusals are not explained to the sender")


def _rule_options(ctx: CommandContext) -> dict[str, bool]:
    """The rule options the flags ask for (only those differing from the defaults)."""
    options: dict[str, bool] = {}
    if ctx.flags.get("overridable"):
        options["overridable"] = True
    if ctx.flags.get("no-notify"):
        options["notify_sender"] = False
    return options


WINDOW_FLAG = Flag(
    "window", "how far back --retroactive looks (default dlp.retroactive_window)", value="DUR"
)


def _action(ctx: CommandContext) -> str:
    """The --action flag as one token: ``block`` or, for several, ``block+notify``."""
    wanted = [a.strip().lower() for a in str(ctx.flags.get("action", "block")).split(",")]
    unknown = [a for a in wanted if a not in ACTIONS]
    if unknown or not any(wanted):
        raise CommandError(
            f"--action must be one or more of {', '.join(ACTIONS)} (comma-separated), "
            f"not {', '.join(unknown) or 'nothing'}"
        )
    return "+".join(a for a in ACTIONS if a in wanted)


def _window_ms(ctx: CommandContext) -> int:
    if "window" in ctx.flags:
        try:
            return parse_duration(str(ctx.flags["window"]))
        except DurationError as e:
            raise CommandError(f"--window: {e}") from None
    raw = ctx.services.config.raw
    try:
        return layers.retroactive_window_ms(raw.get("dlp") or {})
    except ValueError:
        return layers.retroactive_window_ms({})


def stage_change(
    ctx: CommandContext,
    doc: Mapping[str, Any],
    what: str,
    retro: tuple[str, str | None, str] | None = None,
) -> str:
    """Validate the new document, stage it for the commit, swap the engine after it.

    ``retro`` (rule name, the new keyword if only it counts, what to call it) with
    ``--retroactive`` schedules the archive scan after the commit. Returns the text to add
    to the reply.
    """
    live = ctx.services.policy
    if "window" in ctx.flags and not ctx.flags.get("retroactive"):
        raise CommandError("--window only makes sense with --retroactive")
    window = _window_ms(ctx) if ctx.flags.get("retroactive") else 0
    try:
        engine = live.preview(doc)
    except InvalidPattern as e:
        raise CommandError(f"the pattern was refused by RE2: {e.reason}") from None
    except ValueError as e:
        raise CommandError(str(e)) from None
    ctx.stage(live.stage("dlp", dict(doc), engine))
    ctx.audit["change"] = what
    if not (retro and ctx.flags.get("retroactive")):
        return ""
    rule, probe_word, name = retro
    scan = RetroScan(
        scope=scope_of(ctx),
        rules=frozenset({rule}),
        since_ms=int(time.time() * 1000) - window,
        window_ms=window,
        requested_by=ctx.sender,
        command_room=ctx.room_id,
        change=name,
        probe_word=probe_word,
    )
    ctx.audit["retroactive"] = {"window_ms": window, "rule": rule}
    services = ctx.services
    ctx.after_commit.append(lambda: services.start_retroactive_scan(engine, scan))
    return (
        f"\nScanning the archive of the last {format_duration(window)} in the background; "
        "the result will be reported in the management room."
    )


@commands.command(
    "dlp",
    "add-keyword",
    summary='block (or act on) a word or "a phrase"',
    args=(Arg("word", "the word, or a phrase in quotes"),),
    flags=(ACTION_FLAG, SCOPE_FLAG, RETRO_FLAG, WINDOW_FLAG),
    room_scoped=True,
)
async def add_keyword(ctx: CommandContext) -> Reply:
    """Block (or act on) a word or phrase, optionally also in the archive."""
    scope, action = scope_of(ctx), _action(ctx)
    word = ctx.args["word"].strip()
    if not word:
        raise CommandError("the keyword is empty")
    doc = layers.add_keyword(ctx.services.policy.runtime_dlp, scope, word, action)
    probe_word = None
    if ctx.flags.get("retroactive"):
        # The scan counts this word only, not the other words of its list.
        try:
            probe = DlpEngine.compile(DlpPolicy(keyword_lists=(KeywordList("new", (word,)),)))
        except ValueError as e:
            raise CommandError(str(e)) from None
        probe_word = probe.policy.keyword_lists[0].keywords[0]
    rule = f"keyword:{layers.RUNTIME_PREFIX}{action}"
    label = where(scope, ctx)
    more = stage_change(
        ctx,
        doc,
        f"add keyword ({action}) {label}",
        (rule, probe_word, f"keyword {word!r} ({rule})"),
    )
    return Reply.plain(f"✅ keyword added ({action}) {label}: {word}{more}")


@commands.command(
    "dlp",
    "remove-keyword",
    summary="remove a keyword added with add-keyword",
    args=(Arg("word", "the word or phrase"),),
    flags=(SCOPE_FLAG,),
    room_scoped=True,
)
async def remove_keyword(ctx: CommandContext) -> Reply:
    """Remove a keyword added by command (config keywords stay)."""
    scope = scope_of(ctx)
    doc, found = layers.remove_keyword(ctx.services.policy.runtime_dlp, scope, ctx.args["word"])
    if not found:
        raise CommandError(
            f"no runtime keyword {ctx.args['word']!r} {where(scope)} "
            "(keywords from config.yaml are changed in that file)"
        )
    stage_change(ctx, doc, f"remove keyword {where(scope)}")
    return Reply.plain(f"✅ keyword removed {where(scope)}: {ctx.args['word']}")


@commands.command(
    "dlp",
    "add-regex",
    summary="add or replace a named RE2 pattern",
    args=(Arg("name", "rule name"), Arg("pattern", "RE2 pattern", rest=True)),
    flags=(ACTION_FLAG, SCOPE_FLAG, RETRO_FLAG, WINDOW_FLAG, OVERRIDABLE_FLAG, NO_NOTIFY_FLAG),
    room_scoped=True,
)
async def add_regex(ctx: CommandContext) -> Reply:
    """Add or replace a named RE2 pattern."""
    scope, action = scope_of(ctx), _action(ctx)
    name = ctx.args["name"]
    doc = layers.add_regex(
        ctx.services.policy.runtime_dlp,
        scope,
        name,
        ctx.args["pattern"],
        action,
        _rule_options(ctx),
    )
    label = where(scope, ctx)
    more = stage_change(
        ctx,
        doc,
        f"add regex {name} ({action}) {label}",
        (f"regex:{name}", None, f"regex:{name}"),
    )
    return Reply.plain(f"✅ regex {name} ({action}) set {label}{more}")


@commands.command(
    "dlp",
    "detectors",
    summary="enable or disable a built-in detector (" + ", ".join(sorted(DETECTORS)) + ")",
    args=(
        Arg("switch", choices=("enable", "disable")),
        Arg("name", choices=tuple(sorted(DETECTORS))),
    ),
    flags=(ACTION_FLAG, SCOPE_FLAG, RETRO_FLAG, WINDOW_FLAG, OVERRIDABLE_FLAG, NO_NOTIFY_FLAG),
    room_scoped=True,
)
async def detectors(ctx: CommandContext) -> Reply:
    """Enable or disable a built-in detector."""
    scope, name = scope_of(ctx), ctx.args["name"]
    action = _action(ctx) if ctx.args["switch"] == "enable" else None
    if action is None and ctx.flags.get("retroactive"):
        raise CommandError("--retroactive only applies when enabling a detector")
    doc = layers.set_detector(
        ctx.services.policy.runtime_dlp, scope, name, action, _rule_options(ctx)
    )
    state = f"enabled ({action})" if action else "disabled"
    label = where(scope, ctx)
    more = stage_change(
        ctx,
        doc,
        f"detector {name} {state} {label}",
        (f"detector:{name}", None, f"detector:{name}"),
    )
    return Reply.plain(f"✅ detector {name} {state} {label}{more}")


@commands.command(
    "dlp",
    "encryption",
    summary="forbid end-to-end encryption (the gate refuses it), allow it, or inherit",
    args=(Arg("setting", choices=("forbid", "allow", "inherit")),),
    flags=(SCOPE_FLAG,),
    room_scoped=True,
)
async def encryption(ctx: CommandContext) -> Reply:
    """Forbid, allow or inherit end-to-end encryption at a scope."""
    scope, setting = scope_of(ctx), ctx.args["setting"]
    forbid = {"forbid": True, "allow": False, "inherit": None}[setting]
    doc = layers.set_encryption(ctx.services.policy.runtime_dlp, scope, forbid)
    label = where(scope, ctx)
    stage_change(ctx, doc, f"encryption {setting} {label}")
    if forbid is None:
        return Reply.plain(f"✅ encryption rule removed {label}: the wider scope decides")
    if forbid:
        return Reply.plain(
            f"✅ end-to-end encryption is now forbidden {label}: the gate refuses"
            " m.room.encryption. Rooms that are already encrypted stay encrypted."
        )
    return Reply.plain(f"✅ end-to-end encryption is allowed {label}")


@commands.command(
    "dlp",
    "list",
    summary="the DLP rules in force (here: in this room)",
    role=Role.AUDITOR,
    flags=(SCOPE_FLAG,),
    room_scoped=True,
)
async def list_rules(ctx: CommandContext) -> Reply:
    """The DLP rules in force at a scope."""
    scope = scope_of(ctx)
    engine = ctx.services.policy.engine.dlp_for(room_of(scope))
    policy = engine.policy
    if not ctx.in_management_room:  # rule contents would leak into this room
        forbidden = ctx.services.policy.engine.encryption_forbidden(room_of(scope))
        return Reply.lines(
            *redact_rule_listing(policy, where(scope, ctx), encryption_forbidden=forbidden)
        )
    items = []
    for kl in policy.keyword_lists:
        acts = ", ".join(sorted(kl.actions))
        mode = "whole words" if kl.whole_word else "substrings"
        items.append(f"keywords {kl.name} [{acts}, {mode}]: " + ", ".join(kl.keywords))
    for rx in policy.regex_rules:
        items.append(f"regex {rx.name} [{', '.join(sorted(rx.actions))}]: {rx.pattern}")
    for det in policy.detectors:
        items.append(f"detector {det.name} [{', '.join(sorted(det.actions))}]")
    for allowed in policy.allowed_phrases:
        items.append(f"exception {allowed.rule}: “{allowed.phrase}”")
    if policy.exempt_users or policy.exempt_rooms:
        items.append("exempt: " + ", ".join(sorted(policy.exempt_users | policy.exempt_rooms)))
    if ctx.services.policy.engine.encryption_forbidden(room_of(scope)):
        items.append("end-to-end encryption: forbidden (the gate refuses m.room.encryption)")
    title = f"DLP rules in force {where(scope, ctx)}" + ("" if items else ": none")
    return Reply.lines(title, items)


@commands.command(
    "dlp",
    "test",
    summary="which rules TEXT would match here, and what would happen (nothing is sent)",
    role=Role.AUDITOR,
    args=(Arg("text", "the text to try", rest=True),),
    room_scoped=True,
)
async def test_text(ctx: CommandContext) -> Reply:
    """Which rules a text would match here (the text is not kept in the audit record)."""
    engine = ctx.services.policy.engine.dlp_for(ctx.room_id)
    findings = engine.scan([ctx.args["text"]])
    ctx.audit["matched"] = [f.rule for f in findings]
    ctx.args.pop("text", None)  # the tested text is not kept in the audit record
    if not ctx.in_management_room:  # rule names and excerpts would leak into this room
        return Reply.plain(redact_test_result(findings))
    if not findings:
        return Reply.plain("No DLP rule matches: the message would be sent.")
    blocked = any(Action.BLOCK in f.actions for f in findings)
    items = [
        f"{f.rule}: {', '.join(sorted(f.actions))}" + (f" ({f.excerpt})" if f.excerpt else "")
        for f in findings
    ]
    title = "The gate would refuse this message." if blocked else "The message would pass."
    return Reply.lines(title, items)
