"""Declarative admin commands: declared once, parsed, authorised, and documented by help.

A command is a coroutine decorated with :meth:`CommandRegistry.command`, naming its words
(``("dlp", "add-keyword")``), the role it needs, its positional arguments and its flags.
Parsing and help come from these declarations, so they cannot drift apart.
"""

from __future__ import annotations

import difflib
import html
import shlex
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

ROLE_RANK = {None: 0, "auditor": 1, "admin": 2}
MAX_COMMAND_LENGTH = 4000

# Clients on phones turn quotes into typographic ones; accept them as plain quotes.
_QUOTES = str.maketrans({"\u201c": '"', "\u201d": '"', "\u2018": "'", "\u2019": "'"})


class CommandError(Exception):
    """A user-facing problem with a command (bad arguments, not allowed, …)."""


class NeedsConfirmation(CommandError):
    """The command would have wide effects: repeat with ``--yes`` or react ✅ to confirm."""


def role_allows(role: str | None, needed: str) -> bool:
    """``admin`` includes everything ``auditor`` may do."""
    return ROLE_RANK.get(role, 0) >= ROLE_RANK[needed]


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


@dataclass(frozen=True, slots=True)
class Reply:
    """A bot reply: plain text and the same as (escaped) HTML."""

    text: str
    html: str

    @classmethod
    def plain(cls, text: str) -> Reply:
        """A reply whose HTML is the text escaped, line breaks kept."""
        return cls(text, "<br>".join(html.escape(line) for line in text.split("\n")))

    @classmethod
    def lines(cls, title: str, items: Sequence[str]) -> Reply:
        """A title and a bullet list, every part escaped."""
        text = "\n".join([title, *(f"• {i}" for i in items)])
        body = "".join(f"<li>{html.escape(i)}</li>" for i in items)
        return cls(
            text,
            f"<p>{html.escape(title)}</p><ul>{body}</ul>"
            if items
            else f"<p>{html.escape(title)}</p>",
        )


@dataclass
class CommandContext:
    """What a handler gets: who asked, where, the parsed arguments, and the services.

    Handlers never write directly: they stage ``state_updates``, ``actions`` and an
    ``audit`` summary, which the worker commits together with the command's processing.
    """

    sender: str
    room_id: str
    event_id: str
    role: str | None
    in_management_room: bool
    args: dict[str, Any]
    flags: dict[str, Any]
    services: Any
    state_updates: dict[str, str] = field(default_factory=dict)
    actions: list[Any] = field(default_factory=list)
    audit: dict[str, Any] = field(default_factory=dict)
    after_commit: list[Callable[[], None]] = field(default_factory=list)


Handler = Callable[[CommandContext], Awaitable[Reply]]


@dataclass(frozen=True, slots=True)
class CommandSpec:
    words: tuple[str, ...]
    summary: str
    role: str
    handler: Handler
    args: tuple[Arg, ...] = ()
    flags: tuple[Flag, ...] = ()
    room_scoped: bool = False  # may be used in any managed room, not just the management room

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


class CommandRegistry:
    """All commands, looked up by their leading words."""

    def __init__(self) -> None:
        self._specs: dict[tuple[str, ...], CommandSpec] = {}

    def command(
        self,
        *words: str,
        summary: str,
        role: str = "admin",
        args: Sequence[Arg] = (),
        flags: Sequence[Flag] = (),
        room_scoped: bool = False,
    ) -> Callable[[Handler], Handler]:
        """Declare a command."""
        if role not in ("admin", "auditor"):
            raise ValueError(f"unknown role {role!r}")

        def decorator(fn: Handler) -> Handler:
            key = tuple(words)
            if key in self._specs:
                raise ValueError(f"command {' '.join(words)!r} declared twice")
            self._specs[key] = CommandSpec(
                key, summary, role, fn, tuple(args), tuple(flags), room_scoped
            )
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

    def help(self, prefix: str, role: str | None, *, topic: Sequence[str] = ()) -> Reply:
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
