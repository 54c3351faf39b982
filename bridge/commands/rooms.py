"""``!policy federation …``, ``!policy retention …`` and ``!policy rooms``.

A change is validated by compiling the new policy, committed with the command, applied
right after the commit, and rolled out to every managed room through the executor at the
configured rate (with progress reported in the management room). The reply says what is
already known not to work: the rooms where the bot lacks the power to apply the change, why,
and the fix (:func:`bridge.policy.outcomes.change_reply`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from bridge.commands.context import CommandContext
from bridge.commands.errors import CommandError, NeedsConfirmation
from bridge.commands.registry import Arg, CommandGroup, Flag
from bridge.commands.replies import Reply
from bridge.commands.roles import Role
from bridge.commands.scope import SCOPE_FLAG, room_of, scope_of, where
from bridge.policy.durations import DurationError, format_duration, parse_duration
from bridge.policy.engine import PolicyEngine
from bridge.policy.federation import FederationMode, acl_content
from bridge.policy.outcomes import ACL, RETENTION, change_reply
from bridge.policy.rooms import DRIFTED
from bridge.policy.scopes import rooms_in_scope

commands = CommandGroup()
YES_FLAG = Flag("yes", "confirm a change that removes members")


#: Rooms listed per page of ``!policy rooms`` (keeps a reply well under Matrix's 64 KiB).
ROOMS_PAGE = 50
#: A room's line is cut at this length (a lack can list many unkickable members).
ROOM_LINE_LIMIT = 240
ROOM_FILTERS = ("all", "enforced", "drifted", "lacking", "not-joined")
_LABELS = {
    "all": "in all",
    "enforced": "enforced",
    "drifted": "drifted",
    "lacking": "lack power",
    "not-joined": "not joined",
}


def _room_state(row: Mapping[str, Any]) -> tuple[str, str]:
    """The filter a known room falls under, and how it is shown."""
    if not row["joined"]:
        return "not-joined", "not joined"
    if row["lacking"] == DRIFTED:
        return "drifted", "drifted"
    if row["lacking"]:
        return "lacking", f"lacks power: {row['lacking']}"
    return "enforced", "enforced"


def _cut(line: str) -> str:
    return line if len(line) <= ROOM_LINE_LIMIT else line[: ROOM_LINE_LIMIT - 1] + "…"


def _preview(ctx: CommandContext, section: str, doc: Mapping[str, Any]) -> PolicyEngine:
    """The engine with ``doc`` as the section's runtime layer; bad values are refused."""
    try:
        return ctx.services.policy.preview(doc, section)
    except ValueError as e:  # FederationPolicyError, DurationError, … are ValueErrors
        raise CommandError(str(e)) from None


async def _target_rooms(ctx: CommandContext) -> list[str]:
    """The joined rooms a change in the command's scope reaches (its rollout)."""
    live = ctx.services.policy
    joined = {r["room_id"] for r in await ctx.services.store.rooms.known() if r["joined"]}
    covered = rooms_in_scope(scope_of(ctx), joined, live.room_spaces, ctx.services.management_room)
    return [r for r in covered if r in joined]


async def _stage(
    ctx: CommandContext,
    section: str,
    doc: Mapping[str, Any],
    what: str,
    engine: PolicyEngine | None = None,
    rooms: list[str] | None = None,
) -> list[str]:
    """Stage the document and a rollout to the rooms it concerns; returns those rooms.

    ``engine`` is the already compiled preview of ``doc`` and ``rooms`` the rooms it
    reaches (:func:`_target_rooms`), if the caller has them.
    """
    if engine is None:
        engine = _preview(ctx, section, doc)
    if rooms is None:
        rooms = await _target_rooms(ctx)
    ctx.stage(ctx.services.policy.stage(section, doc, engine))
    ctx.stage(ctx.services.rooms.stage_rollout(rooms, what))
    ctx.audit["change"] = what
    return rooms


async def _reply(ctx: CommandContext, head: str, event_type: str, rooms: list[str]) -> Reply:
    """The reply to a staged change reaching ``rooms``: where the bot is known to lack the
    power to send ``event_type`` (the state event the change sets), it says so."""
    lacks = dict(await ctx.services.rooms.known_lacks(rooms, event_type)) if rooms else {}
    return Reply.plain(change_reply(head, len(rooms), lacks, ctx.prefix))


def _describe_federation(ctx: CommandContext, scope: str) -> list[str]:
    engine = ctx.services.policy.engine
    policy = engine.federation_for(room_of(scope))
    items = [f"mode: {policy.mode.value}"]
    if policy.servers:
        items.append("servers: " + ", ".join(policy.servers))
    items.append(f"IP literals: {'allowed' if policy.allow_ip_literals else 'refused'}")
    acl = acl_content(policy, engine.policy.own_server)
    items.append("room ACL: " + (json.dumps(acl, sort_keys=True) if acl else "not managed"))
    return items


@commands.command(
    "federation",
    "show",
    summary="the federation policy in force",
    role=Role.AUDITOR,
    flags=(SCOPE_FLAG,),
    room_scoped=True,
)
async def fed_show(ctx: CommandContext) -> Reply:
    """The federation policy in force at a scope, with the room ACL it implies."""
    scope = scope_of(ctx)
    return Reply.lines(f"Federation policy {where(scope, ctx)}", _describe_federation(ctx, scope))


async def _change_federation(ctx: CommandContext, doc: dict[str, Any], what: str) -> Reply:
    """Stage a federation change; one that removes members needs ``--yes`` or ✅."""
    scope = scope_of(ctx)
    live = ctx.services.policy
    candidate = _preview(ctx, "federation", doc)
    rooms = await _target_rooms(ctx)
    if candidate.policy.kick_excluded and not ctx.flags.get("yes"):
        # Members the new policy removes and the one in force keeps, in the rooms the
        # change reaches (counted from the stored members, also after a restart).
        affected = await ctx.services.rooms.affected(
            live.engine.federation_for,
            candidate.federation_for,
            candidate.policy.own_server,
            rooms,
        )
        if affected:
            raise NeedsConfirmation(
                f"{affected.describe()}\nRepeat the command with --yes or react ✅ to it "
                "to apply it."
            )
    await _stage(ctx, "federation", doc, what, candidate, rooms)
    return await _reply(ctx, f"{what} {where(scope, ctx)}", ACL, rooms)


def _fed_doc(ctx: CommandContext) -> tuple[dict[str, Any], dict[str, Any]]:
    """The runtime federation document and its entry for the scope (servers filled in)."""
    live = ctx.services.policy
    doc = live.doc("federation")
    scope = scope_of(ctx)
    if "servers" not in doc.setdefault(scope, {}):
        current = live.engine.federation_for(room_of(scope))
        doc[scope]["servers"] = list(current.servers)
    return doc, doc[scope]


@commands.command(
    "federation",
    "mode",
    summary="open, allowlist, denylist or internal",
    args=(Arg("mode", choices=tuple(m.value for m in FederationMode)),),
    flags=(SCOPE_FLAG, YES_FLAG),
    room_scoped=True,
)
async def fed_mode(ctx: CommandContext) -> Reply:
    """Set the federation mode at a scope."""
    doc, scoped = _fed_doc(ctx)
    scoped["mode"] = ctx.args["mode"]
    return await _change_federation(ctx, doc, f"federation mode set to {ctx.args['mode']}")


async def _change_servers(ctx: CommandContext, verb: str) -> Reply:
    """``federation allow|deny|remove SERVER``: change the list (and the mode it implies)."""
    doc, scoped = _fed_doc(ctx)
    server = ctx.args["server"].strip().lower()
    servers: list[str] = list(scoped["servers"])
    mode = ctx.services.policy.engine.federation_for(room_of(scope_of(ctx))).mode.value
    if verb == "remove":
        if server not in servers:
            raise CommandError(f"{server} is not in the list")
        servers.remove(server)
    else:
        wanted = "allowlist" if verb == "allow" else "denylist"
        if mode != wanted:
            scoped["mode"] = wanted
        if server not in servers:
            servers.append(server)
    scoped["servers"] = servers
    return await _change_federation(ctx, doc, f"federation {verb} {server}")


SERVER_ARG = Arg("server", "server name or glob, e.g. partner.example or *.evil.example")


@commands.command(
    "federation",
    "allow",
    summary="add a server (glob) to the allowlist",
    args=(SERVER_ARG,),
    flags=(SCOPE_FLAG, YES_FLAG),
    room_scoped=True,
)
async def fed_allow(ctx: CommandContext) -> Reply:
    """Allow a server (switching to allowlist mode)."""
    return await _change_servers(ctx, "allow")


@commands.command(
    "federation",
    "deny",
    summary="add a server (glob) to the denylist",
    args=(SERVER_ARG,),
    flags=(SCOPE_FLAG, YES_FLAG),
    room_scoped=True,
)
async def fed_deny(ctx: CommandContext) -> Reply:
    """Deny a server (switching to denylist mode)."""
    return await _change_servers(ctx, "deny")


@commands.command(
    "federation",
    "remove",
    summary="remove a server from the list",
    args=(SERVER_ARG,),
    flags=(SCOPE_FLAG, YES_FLAG),
    room_scoped=True,
)
async def fed_remove(ctx: CommandContext) -> Reply:
    """Remove a server from the allow- or denylist."""
    return await _change_servers(ctx, "remove")


@commands.command(
    "retention",
    "show",
    summary="the retention policy in force",
    role=Role.AUDITOR,
    flags=(SCOPE_FLAG,),
    room_scoped=True,
)
async def ret_show(ctx: CommandContext) -> Reply:
    """The retention policy in force at a scope."""
    scope = scope_of(ctx)
    policy = ctx.services.policy.engine.retention_for(room_of(scope))
    return Reply.plain(f"Retention {where(scope, ctx)}: {policy.describe()}")


@commands.command(
    "retention",
    "set",
    summary="delete messages older than DURATION (30d, 12h, 1y)",
    args=(Arg("duration", "e.g. 30d"),),
    flags=(SCOPE_FLAG, YES_FLAG),
    room_scoped=True,
)
async def ret_set(ctx: CommandContext) -> Reply:
    """Set a maximum message age; deleting existing messages needs ``--yes`` or ✅."""
    try:
        ms = parse_duration(ctx.args["duration"])
    except DurationError as e:
        raise CommandError(str(e)) from None
    scope = scope_of(ctx)
    live = ctx.services.policy
    current = live.engine.retention_for(room_of(scope))
    shorter = current.max_lifetime_ms is None or ms < current.max_lifetime_ms
    if shorter and not ctx.flags.get("yes"):
        events, rooms = await ctx.services.count_expiring(scope, ms)
        if events:
            raise NeedsConfirmation(
                f"this would delete {events} existing message(s) in {rooms} room(s). "
                "Repeat the command with --yes or react ✅ to it to apply it."
            )
    doc = live.doc("retention")
    doc.setdefault(scope, {})["max_lifetime"] = ctx.args["duration"]
    targets = await _stage(ctx, "retention", doc, f"retention set to {format_duration(ms)}")
    head = f"messages older than {format_duration(ms)} will be removed {where(scope, ctx)}"
    return await _reply(ctx, head, RETENTION, targets)


@commands.command(
    "retention",
    "off",
    summary="keep messages forever",
    flags=(SCOPE_FLAG,),
    room_scoped=True,
)
async def ret_off(ctx: CommandContext) -> Reply:
    """Keep messages forever at a scope."""
    scope = scope_of(ctx)
    live = ctx.services.policy
    doc = live.doc("retention")
    doc.setdefault(scope, {})["max_lifetime"] = "off"
    rooms = await _stage(ctx, "retention", doc, "retention off")
    return await _reply(ctx, f"retention off {where(scope, ctx)}", RETENTION, rooms)


def _undecryptable_lines(counts: Mapping[str, int]) -> list[str]:
    """The encrypted events the bot's device could not decrypt yet, per room."""
    if not counts:
        return ["🔒 no end-to-end encrypted events undecryptable"]
    total = sum(counts.values())
    lines = [f"🔒 {total} end-to-end encrypted event(s) undecryptable (waiting for keys):"]
    for room, n in sorted(counts.items(), key=lambda kv: -kv[1])[:ROOMS_PAGE]:
        lines.append(_cut(f"{room}: {n} undecryptable"))
    return lines


@commands.command(
    "rooms",
    summary=(
        f"the rooms the bridge knows, with their enforcement state, {ROOMS_PAGE} a page "
        "(filter: enforced, drifted, lacking, not-joined)"
    ),
    role=Role.AUDITOR,
    args=(Arg("state", "which rooms", required=False, choices=ROOM_FILTERS),),
    flags=(Flag("page", "page number, from 1", value="N"),),
)
async def rooms_cmd(ctx: CommandContext) -> Reply:
    """The known rooms and their enforcement state, a page at a time."""
    wanted = ctx.args.get("state", "all")
    raw_page = str(ctx.flags.get("page", "1"))
    if not raw_page.isdigit() or int(raw_page) < 1:
        raise CommandError(f"--page must be a whole number from 1, not {raw_page!r}")
    page = int(raw_page)
    counts = dict.fromkeys(ROOM_FILTERS[1:], 0)
    items = []
    for r in await ctx.services.store.rooms.known():
        if r["room_id"] == ctx.services.management_room:
            continue
        state, text = _room_state(r)
        counts[state] += 1
        if wanted in ("all", state):
            items.append(_cut(f"{r['room_id']}: {text}"))
    total = sum(counts.values())
    pages = max(1, -(-len(items) // ROOMS_PAGE))
    if page > pages:
        raise CommandError(f"there are {pages} page(s) of {wanted} rooms; page {page} is empty")
    shown = items[(page - 1) * ROOMS_PAGE : page * ROOMS_PAGE]
    if ctx.services.config.e2ee.enabled:
        shown = shown + _undecryptable_lines(ctx.services.undecryptable_counts())
    summary = ", ".join(f"{n} {_LABELS[k]}" for k, n in counts.items() if n)
    title = f"{total} room(s) besides the management room" + (f": {summary}" if summary else "")
    if wanted != "all":
        title += f". {len(items)} {_LABELS[wanted]}"
    if pages > 1:
        more = f"{ctx.prefix} rooms {wanted} --page {page + 1}" if page < pages else ""
        title += f". Page {page} of {pages}" + (f" (next: {more})" if more else "")
    return Reply.lines(title, shown)
