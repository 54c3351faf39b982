"""Declarative admin commands: declared once, parsed, authorised, and documented by help.

A command is a module-level coroutine declared with :meth:`CommandGroup.command`, naming
its words (``("dlp", "add-keyword")``), the :class:`~bridge.commands.roles.Role` it needs,
its positional arguments and its flags. Each command module has one group; the registry
collects the groups (:func:`bridge.commands.catalog.build_registry`). Parsing and help come
from these declarations, so they cannot drift apart.
"""

from __future__ import annotations

import difflib
import html
import shlex
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from bridge.commands.context import CommandContext
from bridge.commands.errors import CommandError, NeedsConfirmation
from bridge.commands.replies import Reply
from bridge.commands.roles import Role, role_allows

MAX_COMMAND_LENGTH = 4000

# Clients on phones turn quotes into typographic ones; accept them as plain quotes.
_QUOTES = str.maketrans({"\u201c": '"', "\u201d": '"', "\u2018": "'", "\u2019": "'"})


@dataclass(frozen=True, slots=True)
class Arg:
    """A positional argument. ``rest`` takes all remaining words joined by spaces."""

    name: str
    help: str = ""
    required: bool = True
    rest: bool = False
    choices: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Flag:
    """A ``--flag`` or ``--flag VALUE`` option."""

    name: str
    help: str = ""
    value: str | None = None  # metavar when the flag takes a value
    choices: tuple[str, ...] = ()


Handler = Callable[[CommandContext], Awaitable[Reply]]


@dataclass(frozen=True, slots=True)
class CommandSpec:
    words: tuple[str, ...]
    summary: str
    role: Role
    handler: Handler
    args: tuple[Arg, ...] = ()
    flags: tuple[Flag, ...] = ()
    room_scoped: bool = False  # may be used in any managed room, not just the management room
    # Self-service: only in the asker's own policy-notice room, with or without a role.
    notice_room: bool = False

    @property
    def name(self) -> str:
        return " ".join(self.words)

    def usage(self, prefix: str) -> str:
        parts = [prefix, *self.words]
        for a in self.args:
            label = "|".join(a.choices) if a.choices else a.name.upper()
            label += "…" if a.rest else ""
            parts.append(label if a.required else f"[{label}]")
        for f in self.flags:
            val = "|".join(f.choices) if f.choices else f.value
            parts.append(f"[--{f.name}{' ' + val if val else ''}]")
        return " ".join(parts)


@dataclass(frozen=True, slots=True)
class ParsedCommand:
    spec: CommandSpec
    args: dict[str, Any]
    flags: dict[str, Any]


def tokenize(text: str) -> list[str]:
    """Split a command line into words; "quoted phrases" stay one word.

    Backslashes are kept as typed (regex patterns need them) and ``#`` is not a comment.
    """
    if len(text) > MAX_COMMAND_LENGTH:
        raise CommandError(
            f"the command is too long ({len(text)} characters; at most {MAX_COMMAND_LENGTH})"
        )
    lexer = shlex.shlex(text.translate(_QUOTES), posix=True)
    lexer.whitespace_split = True
    lexer.escape = ""
    lexer.commenters = ""
    try:
        return list(lexer)
    except ValueError as e:
        raise CommandError(f"could not read the command: {e} (check your quotes)") from None


class CommandGroup:
    """The commands one module declares, in declaration order.

    ``@group.command("dlp", "list", summary=…, role=Role.AUDITOR)`` on a module-level
    coroutine records its spec and returns the coroutine unchanged, so handlers stay
    importable and callable on their own.
    """

    def __init__(self) -> None:
        self.specs: list[CommandSpec] = []

    def command(
        self,
        *words: str,
        summary: str,
        role: Role = Role.ADMIN,
        args: Sequence[Arg] = (),
        flags: Sequence[Flag] = (),
        room_scoped: bool = False,
        notice_room: bool = False,
    ) -> Callable[[Handler], Handler]:
        """Declare a command handled by the decorated coroutine."""
        if not isinstance(role, Role):
            raise ValueError(f"unknown role {role!r}")

        def decorator(fn: Handler) -> Handler:
            self.specs.append(
                CommandSpec(
                    tuple(words),
                    summary,
                    role,
                    fn,
                    tuple(args),
                    tuple(flags),
                    room_scoped,
                    notice_room,
                )
            )
            return fn

        return decorator


class CommandRegistry:
    """All commands, looked up by their leading words."""

    def __init__(self, groups: Iterable[CommandGroup] = ()) -> None:
        self._specs: dict[tuple[str, ...], CommandSpec] = {}
        for group in groups:
            self.include(group)

    def add(self, spec: CommandSpec) -> None:
        """Add one command; its words must be new."""
        if spec.words in self._specs:
            raise ValueError(f"command {spec.name!r} declared twice")
        self._specs[spec.words] = spec

    def include(self, group: CommandGroup) -> None:
        """Add every command of ``group``."""
        for spec in group.specs:
            self.add(spec)

    def command(
        self,
        *words: str,
        summary: str,
        role: Role = Role.ADMIN,
        args: Sequence[Arg] = (),
        flags: Sequence[Flag] = (),
        room_scoped: bool = False,
        notice_room: bool = False,
    ) -> Callable[[Handler], Handler]:
        """Declare a command directly in this registry (tests, one-off registries)."""
        group = CommandGroup()
        declare = group.command(
            *words, summary=summary, role=role, args=args, flags=flags, room_scoped=room_scoped
        )

        def decorator(fn: Handler) -> Handler:
            declare(fn)
            self.include(group)
            return fn

        return decorator

    @property
    def specs(self) -> list[CommandSpec]:
        return sorted(self._specs.values(), key=lambda s: s.words)

    def find(self, tokens: Sequence[str]) -> tuple[CommandSpec | None, int]:
        """The command with the longest matching word prefix, and how many words it used."""
        for n in range(min(len(tokens), 4), 0, -1):
            spec = self._specs.get(tuple(t.lower() for t in tokens[:n]))
            if spec is not None:
                return spec, n
        return None, 0

    def parse(self, tokens: Sequence[str], prefix: str) -> ParsedCommand:
        """Match tokens (after the prefix) to a command and bind its arguments."""
        spec, used = self.find(tokens)
        if spec is None:
            raise CommandError(self._unknown(tokens, prefix))
        rest = list(tokens[used:])
        flags: dict[str, Any] = {}
        positional: list[str] = []
        by_name = {f.name: f for f in spec.flags}
        i = 0
        while i < len(rest):
            tok = rest[i]
            if tok.startswith("--") and len(tok) > 2:
                name, eq, inline = tok[2:].partition("=")
                flag = by_name.get(name)
                if flag is None:
                    raise CommandError(f"unknown option --{name}. Usage: {spec.usage(prefix)}")
                if flag.value is None:
                    flags[name] = True
                else:
                    if eq:
                        value = inline
                    elif i + 1 < len(rest):
                        i += 1
                        value = rest[i]
                    else:
                        raise CommandError(f"--{name} needs a value. Usage: {spec.usage(prefix)}")
                    if flag.choices and value not in flag.choices:
                        raise CommandError(
                            f"--{name} must be one of {', '.join(flag.choices)}, not {value!r}"
                        )
                    flags[name] = value
            else:
                positional.append(tok)
            i += 1
        args: dict[str, Any] = {}
        for a in spec.args:
            if a.rest:
                if positional:
                    args[a.name] = " ".join(positional)
                    positional = []
                elif a.required:
                    raise CommandError(f"missing {a.name.upper()}. Usage: {spec.usage(prefix)}")
                continue
            if not positional:
                if a.required:
                    raise CommandError(f"missing {a.name.upper()}. Usage: {spec.usage(prefix)}")
                continue
            value = positional.pop(0)
            if a.choices and value.lower() not in a.choices:
                raise CommandError(
                    f"{a.name.upper()} must be one of {', '.join(a.choices)}, not {value!r}"
                )
            args[a.name] = value.lower() if a.choices else value
        if positional:
            raise CommandError(f"unexpected {' '.join(positional)!r}. Usage: {spec.usage(prefix)}")
        return ParsedCommand(spec, args, flags)

    def _unknown(self, tokens: Sequence[str], prefix: str) -> str:
        """Why ``tokens`` name no command, with the closest commands as suggestions."""
        if not tokens:
            return f"say what to do, e.g. `{prefix} help`"
        words = [t.lower() for t in tokens[:4]]
        group = [s.name for s in self.specs if s.words[0] == words[0]]
        if group and len(tokens) == 1:
            return f"`{prefix} {words[0]}` needs a subcommand: " + ", ".join(
                f"`{prefix} {name}`" for name in group
            )
        names = [s.name for s in self.specs]
        close: list[str] = []
        for n in range(len(words), 0, -1):  # the closest match over the most words wins
            close = difflib.get_close_matches(" ".join(words[:n]), names, n=2, cutoff=0.75)
            if close:
                break
        else:
            close = group
        got = " ".join(tokens[:2])
        known = sorted({s.words[0] for s in self._specs.values()})
        hint = " or ".join(f"`{prefix} {c}`" for c in close)
        hint = f" Did you mean {hint}?" if hint else ""
        return f"unknown command {got!r}.{hint} Try `{prefix} help` (groups: {', '.join(known)})"

    def help(self, prefix: str, role: Role | None, *, topic: Sequence[str] = ()) -> Reply:
        """Help for the commands ``role`` may use, optionally only those starting with topic."""
        visible = [
            s
            for s in self.specs
            if role_allows(role, s.role)
            and tuple(w.lower() for w in topic) == s.words[: len(topic)]
        ]
        if not visible:
            return Reply.plain(f"No commands match. Try `{prefix} help`.")
        text_lines = [f"Commands ({prefix} …):"]
        html_items = []
        for s in visible:
            usage = s.usage(prefix)
            text_lines.append(f"{usage}\n    {s.summary} [{s.role}]")
            html_items.append(
                f"<li><code>{html.escape(usage)}</code> — {html.escape(s.summary)} "
                f"<em>[{html.escape(s.role)}]</em></li>"
            )
        return Reply(
            "\n".join(text_lines),
            f"<p>Commands ({html.escape(prefix)} …):</p><ul>{''.join(html_items)}</ul>",
        )


def summarize_args(parsed: ParsedCommand) -> Mapping[str, Any]:
    """The arguments as recorded in the audit store."""
    return {"args": dict(parsed.args), "flags": dict(parsed.flags)}


__all__ = [  # Reply, CommandContext and the errors are re-exported for older imports
    "MAX_COMMAND_LENGTH",
    "Arg",
    "CommandContext",
    "CommandError",
    "CommandGroup",
    "CommandRegistry",
    "CommandSpec",
    "Flag",
    "Handler",
    "NeedsConfirmation",
    "ParsedCommand",
    "Reply",
    "summarize_args",
    "tokenize",
]
