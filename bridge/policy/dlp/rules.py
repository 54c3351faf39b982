"""The rule models: keyword lists, regex rules, detector switches and the policy bundle."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from bridge.policy.dlp.detectors import DETECTORS
from bridge.policy.model import Action

__all__ = ["AllowedPhrase", "DetectorRule", "DlpPolicy", "KeywordList", "RegexRule"]


def _coerce_actions(value: object, where: str) -> frozenset[Action]:
    """Accept an Action, its string value, or an iterable of those (config convenience)."""
    items: Iterable[object]
    if isinstance(value, str | Action):
        items = (value,)
    elif isinstance(value, Iterable):
        items = value
    else:
        raise ValueError(f"{where}: actions must be one or more of {[a.value for a in Action]}")
    out: set[Action] = set()
    for item in items:
        try:
            if not isinstance(item, str):
                raise ValueError(item)
            out.add(Action(item))
        except ValueError:
            raise ValueError(
                f"{where}: unknown action {item!r}; expected one of {[a.value for a in Action]}"
            ) from None
    if not out:
        raise ValueError(f"{where}: at least one action is required")
    return frozenset(out)


def _check_name(name: object, kind: str) -> None:
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"{kind}: name must be a non-empty string, got {name!r}")


@dataclass(frozen=True, slots=True)
class KeywordList:
    """Named list of keywords or phrases.

    ``actions`` also accepts a single :class:`Action` (or its string) and is stored as a
    frozenset. ``whole_word=False`` matches anywhere inside words (substring mode).
    ``notify_sender=False``: refusals are not explained in the sender's notice room;
    ``overridable=True``: the sender may resend a refused message once with a justification.
    """

    name: str
    keywords: tuple[str, ...]
    actions: frozenset[Action] = frozenset({Action.BLOCK})
    whole_word: bool = True
    notify_sender: bool = True
    overridable: bool = False

    def __post_init__(self) -> None:
        _check_name(self.name, "keyword list")
        if isinstance(self.keywords, str) or not isinstance(self.keywords, Iterable):
            raise ValueError(f"keyword list {self.name!r}: keywords must be a list of strings")
        keywords = tuple(self.keywords)
        for kw in keywords:
            if not isinstance(kw, str):
                raise ValueError(f"keyword list {self.name!r}: keyword {kw!r} is not a string")
        object.__setattr__(self, "keywords", keywords)
        object.__setattr__(
            self, "actions", _coerce_actions(self.actions, f"keyword list {self.name!r}")
        )


@dataclass(frozen=True, slots=True)
class RegexRule:
    """Named RE2 pattern (validated by :func:`compile_regex` when the engine is compiled)."""

    name: str
    pattern: str
    actions: frozenset[Action] = frozenset({Action.BLOCK})
    notify_sender: bool = True
    overridable: bool = False

    def __post_init__(self) -> None:
        _check_name(self.name, "regex rule")
        if not isinstance(self.pattern, str):
            raise ValueError(f"regex rule {self.name!r}: pattern must be a string")
        object.__setattr__(
            self, "actions", _coerce_actions(self.actions, f"regex rule {self.name!r}")
        )


@dataclass(frozen=True, slots=True)
class DetectorRule:
    """Enables the built-in detector ``name`` (one of :data:`DETECTORS`) with ``actions``."""

    name: str
    actions: frozenset[Action] = frozenset({Action.BLOCK})
    notify_sender: bool = True
    overridable: bool = False

    def __post_init__(self) -> None:
        if self.name not in DETECTORS:
            raise ValueError(
                f"unknown DLP detector {self.name!r}; expected one of {sorted(DETECTORS)}"
            )
        object.__setattr__(
            self, "actions", _coerce_actions(self.actions, f"detector {self.name!r}")
        )


@dataclass(frozen=True, slots=True)
class AllowedPhrase:
    """An exception to one rule: a match of ``rule`` (``detector:card``, ``keyword:<list>``,
    ``regex:<name>``) that lies entirely inside an occurrence of ``phrase`` is not flagged.

    Typically the answer to a false-positive report (``!policy dlp except``). It never
    suppresses a match elsewhere in the same text, nor another rule's match.
    """

    rule: str
    phrase: str

    def __post_init__(self) -> None:
        if not isinstance(self.rule, str) or self.rule.split(":", 1)[0] not in (
            "keyword",
            "regex",
            "detector",
        ):
            raise ValueError(
                f"allowed phrase: rule must be keyword:<list>, regex:<name> or"
                f" detector:<name>, got {self.rule!r}"
            )
        if not isinstance(self.phrase, str) or not self.phrase.strip():
            raise ValueError(f"allowed phrase for {self.rule}: the phrase is empty")


@dataclass(frozen=True, slots=True)
class DlpPolicy:
    """Everything DLP needs, as one immutable (hashable) bundle.

    ``exempt_users`` holds user IDs (``@alice:example.org``) or server patterns
    (``@*:example.org``); ``exempt_rooms`` holds room IDs.
    """

    keyword_lists: tuple[KeywordList, ...] = ()
    regex_rules: tuple[RegexRule, ...] = ()
    detectors: tuple[DetectorRule, ...] = ()
    exempt_users: frozenset[str] = frozenset()
    exempt_rooms: frozenset[str] = frozenset()
    allowed_phrases: tuple[AllowedPhrase, ...] = ()
