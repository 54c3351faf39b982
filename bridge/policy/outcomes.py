"""What a room-policy change actually did, in words (pure).

A reconcile's result (``sent``/``kicked``/``lacking``/``unkickable``, or ``error``) is
classified into an :class:`Outcome` with its reasons; a rollout adds the outcomes up in a
:class:`RolloutTally`; the texts here are what the command's reply, the rollout's progress
notices and the bot's one notice in a room it cannot enforce say. Nothing here does I/O.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from bridge.policy.rooms import RoomState

ACL = "m.room.server_acl"
RETENTION = "m.room.retention"
#: The key of the power to remove members in :func:`power_lacks`.
KICK = "kick"

#: How an admin gives the bot the power it lacks.
FIX = (
    "To fix it, a room creator raises the bot's power level to the level named, or set "
    "homeserver.admin_token with bridge.obtain_power: true so the bot obtains it itself."
)

#: What the bot cannot do without each power, for the people in the room.
_MEANING = {
    RETENTION: "old messages are not removed on the organization's schedule",
    ACL: "servers the organization does not allow are not kept out",
    KICK: "members from servers that are not allowed are not removed",
}
_BOT_HAS = re.compile(r" \(the bot has [^)]*\)$")
_LEVEL = re.compile(r"power (?:level )?(\S+) to (?:send (\S+)|kick)")


class Outcome(StrEnum):
    """What a reconcile achieved in one room."""

    APPLIED = "applied"  # the room is in line with the policy (changed or already so)
    NOT_APPLIED = "not_applied"  # the bot could not do all of it (power, creators)
    FAILED = "failed"  # the reconcile itself failed (not in the room, refused, errors)


@dataclass(frozen=True, slots=True)
class RoomOutcome:
    """One room's outcome and why it is not :attr:`Outcome.APPLIED` (grouping keys)."""

    outcome: Outcome
    reasons: tuple[str, ...] = ()


def _power_text(value: float) -> str:
    return "creator" if value == float("inf") else str(int(value))


def power_lacks(state: RoomState, bot: str) -> dict[str, str]:
    """The powers the bot lacks in a room, from its state: ``{event type or "kick": lack}``,
    worded like the planner's lacks ("power level 50 to send m.room.retention (the bot has
    0)")."""
    have = state.power_of(bot)
    out: dict[str, str] = {}
    for etype in (ACL, RETENTION):
        need = state.needed_for_state(etype)
        if have < need:
            out[etype] = (
                f"power level {_power_text(need)} to send {etype} (the bot has {_power_text(have)})"
            )
    need = state.needed_for(KICK)
    if have < need:
        out[KICK] = f"power level {_power_text(need)} to kick (the bot has {_power_text(have)})"
    return out


def lack_reason(lack: str) -> str:
    """The grouping key of a lack: what is missing, without what the bot has."""
    return "lacks " + _BOT_HAS.sub("", lack)


def classify(result: Mapping[str, Any], room_id: str = "") -> RoomOutcome:
    """The outcome of one reconcile result (the executor's ``reconcile`` answer, or
    ``{"error": ...}`` when it failed) in ``room_id`` (named in errors: left out, so that
    rooms failing alike group)."""
    if "error" in result:
        error = str(result["error"])
        if room_id:
            error = error.replace(f" in {room_id}", "")
        return RoomOutcome(Outcome.FAILED, (error,))
    reasons = [lack_reason(str(lack)) for lack in result.get("lacking") or ()]
    for item in result.get("unkickable") or ():
        # "@user:server: why" (user IDs hold no space, so the first ": " ends the user)
        _user, _sep, why = str(item).partition(": ")
        reasons.append(f"cannot remove members: {why or item}")
    if reasons:
        return RoomOutcome(Outcome.NOT_APPLIED, tuple(dict.fromkeys(reasons)))
    return RoomOutcome(Outcome.APPLIED)


def power_problem(outcome: RoomOutcome) -> bool:
    """Whether power the bot could be given would fix the room."""
    return any(
        r.startswith("lacks power")
        or "the bot needs power" in r
        or (r.startswith("the bot is not allowed to") and "read the room state" not in r)
        for r in outcome.reasons
    )


@dataclass(slots=True)
class RolloutTally:
    """The outcomes of a rollout so far: rooms applied, and rooms not applied or failed
    counted by reason (a room with two reasons counts under each)."""

    applied: int = 0
    not_applied: int = 0
    failed: int = 0
    reasons: dict[str, int] = field(default_factory=dict)  # not applied: reason -> rooms
    failures: dict[str, int] = field(default_factory=dict)  # failed: reason -> rooms
    fixable: bool = False  # some room lacks power an admin can give

    @property
    def counted(self) -> int:
        return self.applied + self.not_applied + self.failed

    def add(self, outcome: RoomOutcome) -> None:
        """Count one room's outcome."""
        if outcome.outcome is Outcome.APPLIED:
            self.applied += 1
            return
        if outcome.outcome is Outcome.NOT_APPLIED:
            self.not_applied += 1
            into = self.reasons
        else:
            self.failed += 1
            into = self.failures
        for reason in outcome.reasons:
            into[reason] = into.get(reason, 0) + 1
        self.fixable = self.fixable or power_problem(outcome)

    def to_doc(self) -> dict[str, Any]:
        """A JSON-able copy (kept in the rollout record across restarts)."""
        return {
            "applied": self.applied,
            "not_applied": self.not_applied,
            "failed": self.failed,
            "reasons": dict(self.reasons),
            "failures": dict(self.failures),
            "fixable": self.fixable,
        }

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any] | None) -> RolloutTally:
        """The tally :meth:`to_doc` wrote (an empty one for a record without it)."""
        if not isinstance(doc, Mapping):
            return cls()

        def counts(key: str) -> dict[str, int]:
            raw = doc.get(key)
            if not isinstance(raw, Mapping):
                return {}
            return {str(k): int(v) for k, v in raw.items() if isinstance(v, int)}

        def num(key: str) -> int:
            value = doc.get(key)
            return value if isinstance(value, int) else 0

        return cls(
            num("applied"),
            num("not_applied"),
            num("failed"),
            counts("reasons"),
            counts("failures"),
            bool(doc.get("fixable")),
        )


def _rooms(n: int) -> str:
    return f"{n} room" if n == 1 else f"{n} rooms"


def _grouped(counts: Mapping[str, int], limit: int) -> list[str]:
    ordered = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    lines = [f"• {reason}: {_rooms(n)}" for reason, n in ordered[:limit]]
    if len(ordered) > limit:
        lines.append(f"• … and {len(ordered) - limit} more reason(s)")
    return lines


def rollout_text(
    reason: str,
    done: int,
    total: int,
    mark: int,
    tally: RolloutTally,
    *,
    limit: int = 10,
    fix: bool = True,
) -> str:
    """A rollout's progress notice (``mark`` < 100) or final report (``mark`` 100).

    It counts what happened, so a finished rollout that changed nothing does not read as a
    success. ``fix``: say how to give the bot power where it lacks it (a notice that lists
    those rooms says it itself).
    """
    counts = (
        f"applied in {_rooms(tally.applied)}, not applied in {_rooms(tally.not_applied)}, "
        f"failed in {_rooms(tally.failed)}"
    )
    if mark < 100:
        head = f"Policy rollout ({reason}): {done} of {total} rooms processed ({mark}%): {counts}."
    elif total == 0:
        head = f"Policy rollout ({reason}) finished: there was no room to update."
    elif tally.not_applied or tally.failed:
        head = (
            f"⚠️ Policy rollout ({reason}) finished ({done} of {total} rooms processed): {counts}."
        )
    else:
        head = f"✅ Policy rollout ({reason}) finished: applied in all {_rooms(total)}."
    lines = [head]
    if tally.reasons:
        lines.append("Not applied:")
        lines += _grouped(tally.reasons, limit)
    if tally.failures:
        lines.append("Failed:")
        lines += _grouped(tally.failures, limit)
    if tally.fixable and fix:
        lines.append(FIX)
    return "\n".join(lines)


def change_reply(head: str, rooms: int, lacks: Mapping[str, str], prefix: str = "!policy") -> str:
    """The reply to a room-policy change: ``head`` (what was recorded), the rooms it is
    being applied to, and where the bot already knows it lacks the power to (``lacks``:
    room -> lack), with why and the fix."""
    if not lacks:
        return f"✅ {head}. Recorded; applying it to {_rooms(rooms)}."
    blocked = len(lacks)
    if blocked >= rooms:
        first = f"⚠️ {head}. Recorded, but the bot cannot apply it in the {_rooms(rooms)} "
        first += "it reaches:"
    else:
        first = (
            f"⚠️ {head}. Recorded; applying it to {_rooms(rooms)}: applied where the bot can "
            f"({_rooms(rooms - blocked)}), but it cannot apply it in {_rooms(blocked)}:"
        )
    lines = [first]
    counts: dict[str, int] = {}
    for lack in lacks.values():
        key = lack_reason(lack)
        counts[key] = counts.get(key, 0) + 1
    lines += _grouped(counts, 10)
    lines.append(f"`{prefix} rooms lacking` lists them. {FIX}")
    return "\n".join(lines)


def _needed(lacks: Sequence[str]) -> tuple[str, list[str]]:
    """The highest power level the lacks name, and what the missing powers mean."""
    levels: list[str] = []
    meanings: list[str] = []
    for lack in lacks:
        m = _LEVEL.search(lack)
        if m is None:
            continue
        levels.append(m.group(1))
        meaning = _MEANING.get(m.group(2) or KICK)
        if meaning and meaning not in meanings:
            meanings.append(meaning)
    if "creator" in levels:
        return "creator", meanings
    numbers = [int(v) for v in levels if v.isdigit()]
    return (str(max(numbers)) if numbers else ""), meanings


def room_notice(lacks: Iterable[str]) -> str:
    """The bot's one notice in a room where it cannot enforce the organization's policy."""
    lacks = list(lacks)
    level, meanings = _needed(lacks)
    given = {"": "the power it needs", "creator": "a room creator's power"}.get(
        level, f"power level {level}"
    )
    text = (
        "⚠️ The policy bot cannot enforce the organization's policy in this room until it is "
        f"given {given} (it lacks {'; '.join(_BOT_HAS.sub('', lack) for lack in lacks)})."
    )
    if meanings:
        text += " Until then " + "; ".join(meanings) + "."
    return text + " A room creator can raise the bot's power level."
