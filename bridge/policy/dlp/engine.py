"""The DLP engine: keyword lists, admin regexes and validated built-in detectors.

Pure and fast: :meth:`DlpEngine.compile` does all the work once per policy; :meth:`DlpEngine.scan`
then costs a few microseconds per chat message, and is linear in the text (a crafted 64 KiB
event costs at most a few tens of milliseconds: see ``bench/dlp_worst_case.py``).

What runs on which form of the text (see :mod:`bridge.policy.normalize`):

* **Keyword lists** run on the *skeleton* ``normalize(text)`` (overrides in display order,
  invisibles and combining marks removed, NFKD, case-folded, TR39 look-alikes folded to ASCII,
  any run of punctuation, symbols and whitespace one space), with keywords normalized the same
  way (:func:`~bridge.policy.normalize.keyword_forms`). All such keywords of all lists share ONE
  Aho-Corasick automaton; the few keywords that begin or end with punctuation (``c++``) share a
  second one, run on the skeleton with punctuation kept. Whole-word mode checks the
  neighbouring characters of each hit. Characters of scripts written without spaces (CJK,
  Thai, ...) never count as word characters, so whole-word lists still match there.
* **Regex rules** (RE2 only: linear time, no backreferences or lookaround) run on the
  *clean* text (NFKC, invisibles and accents removed, whitespace collapsed, case kept --
  write ``(?i)`` for case-insensitive rules) and, when it differs, on the original text too,
  so patterns that rely on accents, line breaks or exact spacing still work. All rules are
  matched in one pass with an ``RE2::Set``; only rules that matched are searched again for
  the excerpt (at most two per message; further matches are reported without an excerpt).
  To keep every message cheap, at most :data:`MAX_REGEX_RULES` rules apply in a scope, each
  with an RE2 program of at most :data:`MAX_REGEX_PROGRAM_SIZE` and
  :data:`MAX_REGEX_TOTAL_PROGRAM_SIZE` together; a pattern or policy over a cap is refused
  when it is added, saying which cap.
* **Detectors** run on the clean text: full-width digits, zero-width characters or accents
  inside a card number or key, reversed overrides and line-wrapped keys are caught. A
  single ``RE2::Set`` pass tells which detectors have a candidate; only those run their
  validators (Luhn, mod-97, SSN ranges, JWT header decoding, ...).

**Allowed phrases** (:class:`~bridge.policy.dlp.rules.AllowedPhrase`, the answer to a
false-positive report) are compared on the form the rule reads: for keyword lists, a hit
lying entirely inside an occurrence of the phrase's skeleton is skipped and the scan goes on
to the next hit; for regex rules and detectors, a rule found in a text is dropped only when
every occurrence of the phrase matches the rule on its own and the text with those
occurrences cut out no longer matches. A match elsewhere, or of another rule, still counts.

A :class:`~bridge.policy.model.Finding` names the rule (``keyword:<list>``, ``regex:<name>``,
``detector:<name>``) and tells the sender what to do; it never contains the matched text.
Its ``excerpt`` is masked (``4111 **** **** 1111``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any

import ahocorasick
import re2

from bridge.policy.bidi import BIDI_CONTROLS, RLO
from bridge.policy.dlp.detectors import DETECTORS, Detector, mask_text
from bridge.policy.dlp.regex import (
    MAX_REGEX_RULES,
    MAX_REGEX_TOTAL_PROGRAM_SIZE,
    InvalidPattern,
    compile_regex,
    options,
)
from bridge.policy.dlp.rules import AllowedPhrase, DlpPolicy
from bridge.policy.dlp.words import is_word
from bridge.policy.extract import extract_texts
from bridge.policy.model import ALLOW, Action, Finding, Verdict, server_name
from bridge.policy.normalize import (
    clean,
    clean_ascii,
    fold,
    fold_ascii,
    fold_literal,
    keyword_forms,
)

__all__ = ["CATEGORY", "DlpEngine"]

CATEGORY = "dlp"

# Matched regex rules per scan searched again for their (masked) excerpt; the others report
# no excerpt. One search of a 60 KB message can cost milliseconds with a heavy pattern.
_MAX_EXCERPT_SEARCHES = 2


class Request(StrEnum):
    """What the gate is judging, so that a refusal names it (not always "your message")."""

    MESSAGE = "message"
    ROOM = "room"  # createRoom: the name, topic, alias and initial state
    STATE = "state"  # a state event sent through the state API (name, topic, ...)
    ALIAS = "alias"  # a room alias being created


#: (lead, tail) of a blocking rule's message, by request; "{rule}" is filled in.
_BLOCKED: dict[Request, tuple[str, str]] = {
    Request.ROOM: (
        "Your new room was not created: the data-loss-prevention rule {rule} found in its"
        " name, topic, address or initial settings",
        "Remove it and create the room again.",
    ),
    Request.STATE: (
        "This room setting (for example its name or topic) was not changed: the"
        " data-loss-prevention rule {rule} found in it",
        "Remove it and try again.",
    ),
    Request.ALIAS: (
        "This room address was not created: the data-loss-prevention rule {rule} found in it",
        "Choose another address.",
    ),
}


def _request_message(rule: str, what: str, request: Request) -> str:
    lead, tail = _BLOCKED[request]
    return (
        f"{lead.format(rule=repr(rule))} {what}. {tail}"
        " If you think this is a mistake, contact your administrator."
    )


def _message(rule: str, what: str, actions: frozenset[Action], secret: bool) -> str:
    if Action.BLOCK in actions:
        lead = f"Your message was blocked by the data-loss-prevention rule {rule!r}"
        tail = "Remove it and send the message again."
    elif Action.REDACT in actions:
        lead = f"Your message will be removed by the data-loss-prevention rule {rule!r}"
        tail = "Please do not share it in chat."
    else:
        lead = f"Your message matched the data-loss-prevention rule {rule!r}"
        tail = "Please do not share it in chat."
    revoke = " If it is a real credential, revoke it now: it may already have been seen." * secret
    return (
        f"{lead}: it appears to contain {what}. {tail}{revoke}"
        " If you think this is a mistake, contact your administrator."
    )


# --- engine --------------------------------------------------------------------------------

# One automaton entry: (rule index, keyword length, needs boundary left, needs boundary right).
_Entry = tuple[int, int, bool, bool]


@dataclass(frozen=True, slots=True)
class _Rule:
    rule: str
    actions: frozenset[Action]
    what: str
    secret: bool
    notify_sender: bool = True
    overridable: bool = False

    def reworded(self, finding: Finding, request: Request) -> Finding:
        """``finding`` of this rule, its message naming ``request`` instead of a message."""
        if request is Request.MESSAGE or Action.BLOCK not in finding.actions:
            return finding  # only a refusal is explained to the sender
        return replace(finding, message=_request_message(self.rule, self.what, request))

    def finding(self, excerpt: str) -> Finding:
        return Finding(
            rule=self.rule,
            category=CATEGORY,
            actions=self.actions,
            message=_message(self.rule, self.what, self.actions, self.secret),
            excerpt=excerpt,
            notify_sender=self.notify_sender,
            overridable=self.overridable,
        )


# What replaces an allowed phrase when a text is scanned again without it: not a
# separator the detectors read through (spaces, dashes), so digits either side stay apart.
_CUT = " # "


def _typed_order(text: str) -> str:
    """``text`` without its bidirectional controls: the typed (logical) order.

    ``str.replace`` per control present, not ``str.translate`` (which steps in Python's
    slow path, character by character, for a 64 KiB text that is not ASCII).
    """
    for control in BIDI_CONTROLS:
        if control in text:
            text = text.replace(control, "")
    return text


def _phrase_pattern(phrase: str) -> re2._Regexp:
    """The phrase on the clean text: case-insensitive, any run of non-word characters
    between its words (as the skeleton compares them)."""
    words = [w for w in re2.split(r"[^\pL\pN]+", clean(phrase)) if w]
    if not words:
        raise ValueError(f"allowed phrase {phrase!r} has no letters or digits")
    return re2.compile("(?i)" + r"[^\pL\pN]+".join(re2.escape(w) for w in words), options())


def _spans(text: str, needles: Iterable[str]) -> list[tuple[int, int]]:
    """Every whole-word occurrence of each needle in ``text`` as (first, last) positions."""
    out: list[tuple[int, int]] = []
    last = len(text) - 1
    for needle in needles:
        start = text.find(needle)
        while start >= 0:
            end = start + len(needle) - 1
            if not (start > 0 and is_word(text[start - 1])) and not (
                end < last and is_word(text[end + 1])
            ):
                out.append((start, end))
            start = text.find(needle, start + 1)
    return out


def _automaton(entries: Mapping[str, list[_Entry]]) -> Any:
    """One Aho-Corasick automaton over ``entries`` (None when there are none)."""
    if not entries:
        return None
    automaton = ahocorasick.Automaton()
    for norm, bucket in entries.items():
        automaton.add_word(norm, tuple(bucket))
    automaton.make_automaton()
    return automaton


class DlpEngine:
    """A :class:`DlpPolicy` compiled for fast scanning. Immutable once built; thread-safe."""

    __slots__ = (
        "_allowed_forms",
        "_allowed_patterns",
        "_automaton",
        "_detectors",
        "_exempt_rooms",
        "_exempt_servers",
        "_exempt_users",
        "_literal_automaton",
        "_regex_rules",
        "_regex_set",
        "_regexes",
        "_rules",
        "_set_detectors",
        "policy",
    )

    def __init__(self) -> None:
        """Use :meth:`compile`."""
        self.policy = DlpPolicy()
        self._rules: list[_Rule] = []
        self._automaton: Any = None
        self._literal_automaton: Any = None
        self._regexes: list[re2._Regexp] = []
        self._regex_rules: list[int] = []
        self._regex_set: Any = None
        self._detectors: list[tuple[int, Detector]] = []
        self._set_detectors: Any = None
        self._exempt_users: frozenset[str] = frozenset()
        self._exempt_servers: frozenset[str] = frozenset()
        self._exempt_rooms: frozenset[str] = frozenset()
        # Allowed phrases by rule index: skeleton forms (keyword rules), clean-text patterns.
        self._allowed_forms: dict[int, tuple[str, ...]] = {}
        self._allowed_patterns: dict[int, tuple[re2._Regexp, ...]] = {}

    @classmethod
    def compile(cls, policy: DlpPolicy) -> DlpEngine:
        """Validate ``policy`` and build the automaton and pattern sets, once.

        Raises :class:`ValueError` (or its subclass :class:`InvalidPattern`) naming the rule
        that is wrong: duplicate names, keywords empty after normalization, bad patterns,
        bad exemption patterns. Regex rules are capped so that the gate stays fast: at most
        :data:`MAX_REGEX_RULES` rules, each with an RE2 program of at most
        :data:`MAX_REGEX_PROGRAM_SIZE`, together at most
        :data:`MAX_REGEX_TOTAL_PROGRAM_SIZE`; a policy over a cap is refused with a
        :class:`ValueError` that says which cap.
        """
        engine = cls()
        engine.policy = policy
        seen: set[str] = set()

        def add_rule(rule: _Rule) -> int:
            if rule.rule in seen:
                raise ValueError(f"DLP rule {rule.rule!r} is defined twice")
            seen.add(rule.rule)
            engine._rules.append(rule)
            return len(engine._rules) - 1

        # Keywords that begin and end with a word character are compared on the skeleton in
        # which any run of punctuation, symbols and spaces is one separator; the few whose
        # punctuation is part of them (``c++``, ``.env``) on the skeleton that keeps it.
        entries: dict[str, list[_Entry]] = {}
        literal_entries: dict[str, list[_Entry]] = {}
        for klist in policy.keyword_lists:
            index = add_rule(
                _Rule(
                    f"keyword:{klist.name}",
                    klist.actions,
                    f"a term from the keyword list {klist.name!r}",
                    secret=False,
                    notify_sender=klist.notify_sender,
                    overridable=klist.overridable,
                )
            )
            for position, keyword in enumerate(klist.keywords):
                literal = fold_literal(clean(keyword))
                if is_word(literal[:1]) and is_word(literal[-1:]):
                    forms, target = keyword_forms(keyword), entries
                else:
                    forms, target = (literal,), literal_entries
                if not forms[0]:
                    raise ValueError(
                        f"keyword list {klist.name!r}: keyword #{position + 1} ({keyword!r}) is"
                        " empty after normalization"
                    )
                whole = klist.whole_word
                for norm in forms:
                    left, right = whole and is_word(norm[0]), whole and is_word(norm[-1])
                    entry = (index, len(norm), left, right)
                    bucket = target.setdefault(norm, [])
                    if not any(e[0] == index for e in bucket):
                        bucket.append(entry)
        engine._automaton = _automaton(entries)
        engine._literal_automaton = _automaton(literal_entries)

        if len(policy.regex_rules) > MAX_REGEX_RULES:
            raise ValueError(
                f"too many DLP regex rules: {len(policy.regex_rules)} apply here, at most"
                f" {MAX_REGEX_RULES} are allowed (config file and commands, all scopes"
                " together); combine patterns with | or remove unused ones"
            )
        if policy.regex_rules:
            regex_set = re2.Set.SearchSet(options(64 << 20))
            program_size = 0
            for rule in policy.regex_rules:
                try:
                    compiled = compile_regex(rule.pattern)
                except InvalidPattern as exc:
                    raise InvalidPattern(
                        f"regex rule {rule.name!r}: {exc.reason}", rule.pattern
                    ) from None
                index = add_rule(
                    _Rule(
                        f"regex:{rule.name}",
                        rule.actions,
                        f"text matching the pattern rule {rule.name!r}",
                        secret=False,
                        notify_sender=rule.notify_sender,
                        overridable=rule.overridable,
                    )
                )
                program_size += compiled.programsize
                if program_size > MAX_REGEX_TOTAL_PROGRAM_SIZE:
                    raise ValueError(
                        f"regex rule {rule.name!r}: the DLP regex rules that apply here are"
                        f" too complex together (RE2 program size over"
                        f" {MAX_REGEX_TOTAL_PROGRAM_SIZE}, so that every message stays fast"
                        " to check); simplify or remove some patterns"
                    )
                engine._regexes.append(compiled)
                engine._regex_rules.append(index)
                regex_set.Add(rule.pattern)
            try:
                regex_set.Compile()
                engine._regex_set = regex_set
            except re2.error:  # too big for one set: fall back to one search per rule
                engine._regex_set = None

        if policy.detectors:
            detector_set = re2.Set.SearchSet(options())
            for det in policy.detectors:
                spec = DETECTORS[det.name]
                index = add_rule(
                    _Rule(
                        f"detector:{det.name}",
                        det.actions,
                        spec.what,
                        spec.secret,
                        det.notify_sender,
                        det.overridable,
                    )
                )
                engine._detectors.append((index, spec))
                detector_set.Add(spec.prefilter)
            detector_set.Compile()
            engine._set_detectors = detector_set

        engine._add_allowed(policy.allowed_phrases)

        users: set[str] = set()
        servers: set[str] = set()
        for pattern in policy.exempt_users:
            if not isinstance(pattern, str) or not pattern.startswith("@") or ":" not in pattern:
                raise ValueError(
                    f"exempt user {pattern!r}: expected a user ID (@name:server) or @*:server"
                )
            if pattern.startswith("@*:") and "*" not in pattern[3:]:
                servers.add(pattern[3:])
            elif "*" in pattern:
                raise ValueError(
                    f"exempt user {pattern!r}: only the form @*:server may contain '*'"
                )
            else:
                users.add(pattern)
        engine._exempt_users = frozenset(users)
        engine._exempt_servers = frozenset(servers)
        engine._exempt_rooms = frozenset(policy.exempt_rooms)
        return engine

    def _add_allowed(self, phrases: Iterable[AllowedPhrase]) -> None:
        """Index the allowed phrases by rule; phrases of rules not in force are ignored
        (a scope may allow a phrase for a rule only some rooms have)."""
        by_name = {rule.rule: index for index, rule in enumerate(self._rules)}
        forms: dict[int, list[str]] = {}
        patterns: dict[int, list[re2._Regexp]] = {}
        for allowed in phrases:
            pattern = _phrase_pattern(allowed.phrase)  # validates every phrase
            index = by_name.get(allowed.rule)
            if index is None:
                continue
            if allowed.rule.startswith("keyword:"):
                cleaned = clean(allowed.phrase)
                bucket = forms.setdefault(index, [])
                for form in (*keyword_forms(allowed.phrase), fold_literal(cleaned)):
                    if form and form not in bucket:
                        bucket.append(form)
            else:
                patterns.setdefault(index, []).append(pattern)
        self._allowed_forms = {i: tuple(f) for i, f in forms.items()}
        self._allowed_patterns = {i: tuple(p) for i, p in patterns.items()}

    # -- exemptions --

    def is_exempt(self, sender: object, room_id: object) -> bool:
        """Whether DLP does not apply to ``sender`` or in ``room_id``."""
        if isinstance(room_id, str) and room_id in self._exempt_rooms:
            return True
        if isinstance(sender, str):
            if sender in self._exempt_users:
                return True
            if self._exempt_servers and server_name(sender) in self._exempt_servers:
                return True
        return False

    # -- scanning --

    def for_request(self, findings: Iterable[Finding], request: Request) -> list[Finding]:
        """``findings`` (of this engine and others) with this engine's rules' messages
        naming ``request`` (a new room, a room setting, an alias) instead of a message."""
        by_name = {rule.rule: rule for rule in self._rules}
        out = []
        for f in findings:
            rule = by_name.get(f.rule) if f.category == CATEGORY else None
            out.append(rule.reworded(f, request) if rule is not None else f)
        return out

    @property
    def has_rules(self) -> bool:
        """Whether any keyword, regex or detector is in force."""
        return bool(self._rules)

    def check(self, event: Mapping[str, Any]) -> Verdict:
        """Judge one client-format event: exemptions, then :meth:`scan` of its texts."""
        if not isinstance(event, Mapping) or not self.has_rules:
            return ALLOW  # no rules: nothing to extract or normalise
        if self.is_exempt(event.get("sender"), event.get("room_id")):
            return ALLOW
        texts = extract_texts(event)
        if not texts:
            return ALLOW
        findings = self.scan(texts)
        return Verdict(findings) if findings else ALLOW

    def scan(self, texts: Sequence[str]) -> tuple[Finding, ...]:
        """All rules that match any of ``texts``: one finding per rule, in policy order."""
        found: dict[int, str] = {}
        excerpt_searches = [_MAX_EXCERPT_SEARCHES]
        for raw in texts:
            if self._allowed_patterns:
                local: dict[int, str] = {}
                self._scan_text(raw, local, excerpt_searches)
                for index in [i for i in local if i in self._allowed_patterns]:
                    if index not in found and self._explained(index, raw):
                        del local[index]
                found.update({i: e for i, e in local.items() if i not in found})
            else:
                self._scan_text(raw, found, excerpt_searches)
        if not found:
            return ()
        return tuple(self._rules[i].finding(found[i]) for i in sorted(found))

    def _scan_text(self, raw: str, found: dict[int, str], excerpt_searches: list[int]) -> None:
        """Add the rules ``raw`` matches (and are not in ``found`` yet) to ``found``."""
        if not isinstance(raw, str) or not raw:
            return
        if raw.isascii():  # most chat: one pass over bytes for every reader
            data = clean_ascii(raw)
            if not data:
                return
            cleaned = data.decode("ascii")
            skeleton = fold_ascii(data) if self._automaton is not None else ""
        else:
            cleaned = clean(raw)
            if not cleaned:
                return
            data = cleaned.encode("utf-8", "replace")
            skeleton = fold(cleaned) if self._automaton is not None else ""
        if self._automaton is not None:
            self._scan_keywords(self._automaton, skeleton, found)
        if self._literal_automaton is not None:
            self._scan_keywords(self._literal_automaton, fold_literal(cleaned), found)
        if self._regexes:
            self._scan_regexes(cleaned, found, excerpt_searches)
            if raw != cleaned:
                self._scan_regexes(raw, found, excerpt_searches)
        if self._detectors:
            self._scan_detectors(data, found)
        if RLO in raw:
            # Shown reversed, but copied, forwarded and read by machines in the order it was
            # typed: a card or keyword after a right-to-left override is read that way too.
            self._scan_text(_typed_order(raw), found, excerpt_searches)

    def _matches(self, index: int, text: str) -> bool:
        """Whether the regex rule or detector ``index`` matches ``text`` (clean or raw)."""
        if text.isascii():
            data = clean_ascii(text)
        else:
            data = clean(text).encode("utf-8", "replace")
        for position, rule_index in enumerate(self._regex_rules):
            if rule_index == index:
                regex = self._regexes[position]
                raw = text.encode("utf-8", "replace")
                return regex.search(data) is not None or regex.search(raw) is not None
        for rule_index, spec in self._detectors:
            if rule_index == index:
                return spec.find(data) is not None
        return False

    def _explained(self, index: int, raw: str) -> bool:
        """Whether every match of rule ``index`` in ``raw`` lies inside an allowed phrase.

        True when each occurrence of the rule's allowed phrases matches the rule on its own
        and the text with all those occurrences cut out does not match it any more.
        """
        cleaned = clean(raw)
        spans: list[tuple[int, int]] = []
        for pattern in self._allowed_patterns[index]:
            spans += [
                m.span()
                for m in pattern.finditer(cleaned)
                if not (m.start() > 0 and is_word(cleaned[m.start() - 1]))
                and not (m.end() < len(cleaned) and is_word(cleaned[m.end()]))
            ]
        if not spans:
            return False
        spans.sort()
        pieces: list[str] = []
        position = 0
        for start, end in spans:
            if start < position:  # overlapping occurrences: not worth the ambiguity
                return False
            if not self._matches(index, cleaned[start:end]):
                return False
            pieces += [cleaned[position:start], _CUT]
            position = end
        pieces.append(cleaned[position:])
        if self._matches(index, "".join(pieces)):
            return False
        if raw == cleaned:
            return True
        # Regex rules also read the original text (line breaks, accents): cut it there too.
        for pattern in self._allowed_patterns[index]:
            raw = pattern.sub(_CUT, raw)
        return not self._matches(index, raw)

    def _scan_keywords(self, automaton: Any, text: str, found: dict[int, str]) -> None:
        last = len(text) - 1
        allowed: dict[int, list[tuple[int, int]]] = {}
        for end, bucket in automaton.iter(text):
            for index, length, left, right in bucket:
                if index in found:
                    continue
                start = end - length + 1
                if left and start > 0 and is_word(text[start - 1]):
                    continue
                if right and end < last and is_word(text[end + 1]):
                    continue
                forms = self._allowed_forms.get(index)
                if forms is not None:
                    spans = allowed.get(index)
                    if spans is None:
                        spans = allowed[index] = _spans(text, forms)
                    if any(s <= start and end <= e for s, e in spans):
                        continue  # inside an allowed phrase: look at the next hit
                found[index] = mask_text(text[start : end + 1])

    def _scan_regexes(self, text: str, found: dict[int, str], searches: list[int]) -> None:
        """Rules matching ``text``; ``searches[0]`` is the budget of excerpt searches left."""
        data = text.encode("utf-8", "replace")
        if self._regex_set is not None:
            hits: Iterable[int] = self._regex_set.Match(data) or ()
        else:  # no set: every rule is searched anyway, so the excerpt comes for free
            hits = range(len(self._regexes))
            searches = [len(self._regexes)]
        for position in hits:
            index = self._regex_rules[position]
            if index in found:
                continue
            if searches[0] <= 0:  # the set says it matched; skip the costly excerpt search
                found[index] = ""
                continue
            searches[0] -= 1
            m = self._regexes[position].search(data)
            if m is not None:
                found[index] = mask_text(m.group().decode("utf-8", "replace"))

    def _scan_detectors(self, data: bytes, found: dict[int, str]) -> None:
        hits = self._set_detectors.Match(data)
        if not hits:
            return
        for position in hits:
            index, spec = self._detectors[position]
            if index in found:
                continue
            excerpt = spec.find(data)
            if excerpt is not None:
                found[index] = excerpt
