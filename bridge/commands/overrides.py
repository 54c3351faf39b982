"""Overrides with justification: the sender's ``override`` and the admins' list and revoke.

``override REF JUSTIFICATION`` (self-service, in the sender's notice room): for a refusal by
rules marked ``overridable``, the sender may send that same message again in that room,
once, within ``notices.override_window_seconds``. The grant and its justification are
audited (``override`` records; ``audit search --type override``) and the management room
is told. Admins list (``overrides list``) and revoke (``overrides revoke REF``) grants.
"""

from __future__ import annotations

import time

from bridge.audit.kinds import AuditKind
from bridge.commands.context import CommandContext
from bridge.commands.errors import CommandError
from bridge.commands.registry import Arg, CommandGroup
from bridge.commands.replies import Reply
from bridge.commands.roles import Role
from bridge.policy.notices import Ledger, normalize_ref, text, when
from bridge.policy.overrides import Grant
from bridge.store import AuditEntry, NewAction
from bridge.store.notice_rooms import load_ledger

commands = CommandGroup()

_SEND_NOTICE = "send_notice"  # the executor's stored kind (commands do not import the pipeline)


def _tell_management(ctx: CommandContext, reply: Reply) -> None:
    mgmt = ctx.services.management_room
    if mgmt:
        ctx.actions.append(NewAction(_SEND_NOTICE, {"body": reply.text, "html": reply.html}, mgmt))


def _record(ctx: CommandContext, grant: Grant, outcome: str, **extra: object) -> None:
    ctx.records.append(
        AuditEntry(
            kind=AuditKind.OVERRIDE,
            room_id=grant.room_id,
            sender=grant.sender,
            type=outcome,
            data={
                "ref": grant.ref,
                "rule": grant.rule,
                "justification": grant.justification,
                "expires": grant.expires,
                "outcome": outcome,
                "by": ctx.sender,
                **extra,
            },
        )
    )


@commands.command(
    "override",
    summary="justify refusal REF and resend that message once (in your notice room)",
    role=Role.AUDITOR,  # not checked: self-service, see dispatch
    args=(Arg("ref", "the reference in the notice"), Arg("justification", rest=True)),
    notice_room=True,
)
async def override(ctx: CommandContext) -> Reply:
    """Grant the sender one resend of the refused message, if its rules allow overrides."""
    ref = normalize_ref(ctx.args["ref"])
    lang = ctx.services.config.notices.languages.for_user(ctx.sender)
    justification = str(ctx.args.get("justification") or "").strip()
    if len(justification) < 5:
        raise CommandError(text(lang, "need_justification"))
    refusal = Ledger.loads(await load_ledger(ctx.services.store, ctx.sender)).find(ref)
    if refusal is None:
        raise CommandError(text(lang, "unknown_ref", ref=ref))
    if not refusal.overridable or not refusal.digest:
        raise CommandError(
            text(lang, "not_overridable", rule=refusal.rule, prefix=ctx.prefix, ref=ref)
        )
    book = ctx.services.overrides
    earlier = book.get(ref)
    if earlier is not None and (earlier.used or earlier.revoked_by):
        used = text(lang, "used")
        state = used if earlier.used else text(lang, "revoked", admin=earlier.revoked_by)
        raise CommandError(text(lang, "override_done", ref=ref, state=state))
    window = ctx.services.config.notices.override_window
    grant = Grant(
        ref=ref,
        sender=ctx.sender,
        room_id=refusal.room_id,
        digest=refusal.digest,
        rule=refusal.rule,
        expires=time.time() + window,
        justification=justification,
    )
    ctx.after_commit.append(lambda: book.add(grant))
    _record(ctx, grant, "granted")
    ctx.audit.update({"ref": ref, "rule": refusal.rule, "about_room": refusal.room_id})
    _tell_management(
        ctx,
        Reply.lines(
            f"🔓 Override {ref} granted to {ctx.sender}",
            [
                f"rule: {refusal.rule}",
                f"room: {refusal.room_id}",
                f"justification: {justification}",
                f"usable once until {when(grant.expires)}",
                f"revoke: {ctx.prefix} overrides revoke {ref}",
            ],
        ),
    )
    return Reply.plain(
        text(lang, "override_granted", ref=ref, room=refusal.room_id, until=when(grant.expires))
    )


def _status(grant: Grant, now: float) -> str:
    if grant.revoked_by:
        return f"revoked by {grant.revoked_by}"
    if grant.used:
        return "used"
    return "usable" if now < grant.expires else "expired"


@commands.command("overrides", "list", summary="overrides granted to senders", role=Role.AUDITOR)
async def list_overrides(ctx: CommandContext) -> Reply:
    """Every override kept (recent ones), with its status."""
    now = time.time()
    grants = sorted(ctx.services.overrides.grants(), key=lambda g: -g.expires)
    items = [
        f"{g.ref}: {g.sender} in {g.room_id}, rule {g.rule}, {_status(g, now)}"
        f" (until {when(g.expires)}): {g.justification}"
        for g in grants
    ]
    return Reply.lines("Overrides" + ("" if items else ": none"), items)


@commands.command(
    "overrides",
    "revoke",
    summary="revoke override REF (the resend is refused again)",
    role=Role.ADMIN,
    args=(Arg("ref", "the override's reference"),),
)
async def revoke(ctx: CommandContext) -> Reply:
    """Revoke a grant (once committed)."""
    ref = normalize_ref(ctx.args["ref"])
    book = ctx.services.overrides
    grant = book.get(ref)
    if grant is None:
        raise CommandError(f"no override has the reference {ref}.")
    sender = ctx.sender

    def apply() -> None:
        book.revoke(ref, sender)

    ctx.after_commit.append(apply)
    _record(ctx, grant, "revoked")
    ctx.audit["ref"] = ref
    return Reply.plain(f"Override {ref} of {grant.sender} revoked.")
