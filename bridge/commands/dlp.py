"""``!policy dlp …``: keyword lists, regexes and detectors, changed and tested from Matrix.

Changes are staged in the runtime policy document, committed with the command's audit
record, and the new engine is swapped in right after the commit, so the gate enforces them
within the next request.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..policies import RUNTIME_DLP_KEY, LivePolicy
from ..policy import layers
from ..policy.dlp import DETECTORS, InvalidPattern
from ..policy.model import Action
from .registry import Arg, CommandContext, CommandError, CommandRegistry, Flag, Reply

ACTIONS = tuple(a.value for a in Action)
SCOPE_FLAG = Flag("scope", "global, or here (this room)", value="SCOPE", choices=("global", "here"))
ACTION_FLAG = Flag("action", "what a match does (default block)", value="A", choices=ACTIONS)


def _scope(ctx: CommandContext) -> str:
    return ctx.room_id if ctx.flags.get("scope") == "here" else layers.GLOBAL


def _stage(ctx: CommandContext, doc: Mapping[str, Any], what: str) -> None:
    """Validate the new document, stage it for the commit, swap the engine after it."""
    live: LivePolicy = ctx.services.policy
    try:
        engine = live.preview(doc)
    except InvalidPattern as e:
        raise CommandError(f"the pattern was refused by RE2: {e.reason}") from None
    except ValueError as e:
        raise CommandError(str(e)) from None
    candidate = dict(doc)
    ctx.state_updates[RUNTIME_DLP_KEY] = live.encode(candidate)
    ctx.after_commit.append(lambda: live.apply(candidate, engine))
    ctx.audit["change"] = what


def _scope_label(scope: str) -> str:
    return "globally" if scope == layers.GLOBAL else f"in {scope}"


def register(registry: CommandRegistry) -> None:
    """Add the ``dlp`` command group."""

    @registry.command(
        "dlp",
        "add-keyword",
        summary='block (or act on) a word or "a phrase"',
        args=(Arg("word", "the word, or a phrase in quotes"),),
        flags=(ACTION_FLAG, SCOPE_FLAG),
        room_scoped=True,
    )
    async def add_keyword(ctx: CommandContext) -> Reply:
        scope, action = _scope(ctx), ctx.flags.get("action", "block")
        word = ctx.args["word"].strip()
        if not word:
            raise CommandError("the keyword is empty")
        doc = layers.add_keyword(ctx.services.policy.runtime_dlp, scope, word, action)
        _stage(ctx, doc, f"add keyword ({action}) {_scope_label(scope)}")
        return Reply.plain(f"✅ keyword added ({action}) {_scope_label(scope)}: {word}")

    @registry.command(
        "dlp",
        "remove-keyword",
        summary="remove a keyword added with add-keyword",
        args=(Arg("word", "the word or phrase"),),
        flags=(SCOPE_FLAG,),
        room_scoped=True,
    )
    async def remove_keyword(ctx: CommandContext) -> Reply:
        scope = _scope(ctx)
        doc, found = layers.remove_keyword(ctx.services.policy.runtime_dlp, scope, ctx.args["word"])
        if not found:
            raise CommandError(
                f"no runtime keyword {ctx.args['word']!r} {_scope_label(scope)} "
                "(keywords from config.yaml are changed in that file)"
            )
        _stage(ctx, doc, f"remove keyword {_scope_label(scope)}")
        return Reply.plain(f"✅ keyword removed {_scope_label(scope)}: {ctx.args['word']}")

    @registry.command(
        "dlp",
        "add-regex",
        summary="add or replace a named RE2 pattern",
        args=(Arg("name", "rule name"), Arg("pattern", "RE2 pattern", rest=True)),
        flags=(ACTION_FLAG, SCOPE_FLAG),
        room_scoped=True,
    )
    async def add_regex(ctx: CommandContext) -> Reply:
        scope, action = _scope(ctx), ctx.flags.get("action", "block")
        doc = layers.add_regex(
            ctx.services.policy.runtime_dlp, scope, ctx.args["name"], ctx.args["pattern"], action
        )
        _stage(ctx, doc, f"add regex {ctx.args['name']} ({action}) {_scope_label(scope)}")
        return Reply.plain(f"✅ regex {ctx.args['name']} ({action}) set {_scope_label(scope)}")

    @registry.command(
        "dlp",
        "detectors",
        summary="enable or disable a built-in detector (" + ", ".join(sorted(DETECTORS)) + ")",
        args=(
            Arg("switch", choices=("enable", "disable")),
            Arg("name", choices=tuple(sorted(DETECTORS))),
        ),
        flags=(ACTION_FLAG, SCOPE_FLAG),
        room_scoped=True,
    )
    async def detectors(ctx: CommandContext) -> Reply:
        scope, name = _scope(ctx), ctx.args["name"]
        action = ctx.flags.get("action", "block") if ctx.args["switch"] == "enable" else None
        doc = layers.set_detector(ctx.services.policy.runtime_dlp, scope, name, action)
        state = f"enabled ({action})" if action else "disabled"
        _stage(ctx, doc, f"detector {name} {state} {_scope_label(scope)}")
        return Reply.plain(f"✅ detector {name} {state} {_scope_label(scope)}")

    @registry.command(
        "dlp",
        "list",
        summary="the DLP rules in force (here: in this room)",
        role="auditor",
        flags=(SCOPE_FLAG,),
        room_scoped=True,
    )
    async def list_rules(ctx: CommandContext) -> Reply:
        scope = _scope(ctx)
        engine = ctx.services.policy.engine.dlp_for(None if scope == layers.GLOBAL else scope)
        policy = engine.policy
        items = []
        for kl in policy.keyword_lists:
            acts = ", ".join(sorted(kl.actions))
            mode = "whole words" if kl.whole_word else "substrings"
            items.append(f"keywords {kl.name} [{acts}, {mode}]: " + ", ".join(kl.keywords))
        for rx in policy.regex_rules:
            items.append(f"regex {rx.name} [{', '.join(sorted(rx.actions))}]: {rx.pattern}")
        for det in policy.detectors:
            items.append(f"detector {det.name} [{', '.join(sorted(det.actions))}]")
        if policy.exempt_users or policy.exempt_rooms:
            items.append("exempt: " + ", ".join(sorted(policy.exempt_users | policy.exempt_rooms)))
        title = f"DLP rules in force {_scope_label(scope)}" + ("" if items else ": none")
        return Reply.lines(title, items)

    @registry.command(
        "dlp",
        "test",
        summary="which rules TEXT would match here, and what would happen (nothing is sent)",
        role="auditor",
        args=(Arg("text", "the text to try", rest=True),),
        room_scoped=True,
    )
    async def test(ctx: CommandContext) -> Reply:
        engine = ctx.services.policy.engine.dlp_for(ctx.room_id)
        findings = engine.scan([ctx.args["text"]])
        ctx.audit["matched"] = [f.rule for f in findings]
        ctx.args.pop("text", None)  # the tested text is not kept in the audit record
        if not findings:
            return Reply.plain("No DLP rule matches: the message would be sent.")
        blocked = any(Action.BLOCK in f.actions for f in findings)
        items = [
            f"{f.rule}: {', '.join(sorted(f.actions))}" + (f" ({f.excerpt})" if f.excerpt else "")
            for f in findings
        ]
        title = "The gate would refuse this message." if blocked else "The message would pass."
        return Reply.lines(title, items)
