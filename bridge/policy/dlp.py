"""Data-loss prevention: keyword lists, admin regexes and validated built-in detectors.

Pure and fast: :meth:`DlpEngine.compile` does all the work once per policy; :meth:`DlpEngine.scan`
then costs a few microseconds per chat message.

What runs on which form of the text (see :mod:`bridge.policy.normalize`):

* **Keyword lists** run on ``normalize(text)`` (NFKC, case-folded, invisibles removed,
  whitespace collapsed), with keywords normalized the same way. All keywords of all lists
  share ONE Aho-Corasick automaton; whole-word mode checks the neighbouring characters of each
  hit, so phrases and keywords with punctuation work. Characters of scripts written without
  spaces (CJK, Thai, ...) never count as word characters, so whole-word lists still match there.
* **Regex rules** (RE2 only: linear time, no backreferences or lookaround) run on the
  *clean* text (NFKC, invisibles removed, whitespace collapsed, case kept -- write ``(?i)`` for
  case-insensitive rules) and, when it differs, on the original text too, so patterns that rely
  on line breaks or exact spacing still work. All rules are matched in one pass with an
  ``RE2::Set``; only rules that matched are searched again for the excerpt (at most
  two per message; further matches are reported without an excerpt). To keep every message
  cheap, at most :data:`MAX_REGEX_RULES` rules apply in a scope, each with an RE2 program of
  at most :data:`MAX_REGEX_PROGRAM_SIZE` and :data:`MAX_REGEX_TOTAL_PROGRAM_SIZE` together;
  a pattern or policy over a cap is refused when it is added, saying which cap.
* **Detectors** run on the clean text: full-width digits, zero-width characters inside a
  card number and line-wrapped keys are caught. A single ``RE2::Set`` pass tells which
  detectors have a candidate; only those run their validators (Luhn, mod-97, SSN ranges,
  JWT header decoding, ...).

A :class:`~bridge.policy.model.Finding` names the rule (``keyword:<list>``, ``regex:<name>``,
``detector:<name>``) and tells the sender what to do; it never contains the matched text.
Its ``excerpt`` is masked (``4111 **** **** 1111``).
"""

from __future__ import annotations

import base64
import binascii
import json
import unicodedata
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import ahocorasick
import re2

from bridge.policy.extract import extract_texts
from bridge.policy.model import ALLOW, Action, Finding, Verdict, server_name
from bridge.policy.normalize import clean, fold, normalize

__all__ = [
    "DETECTORS",
    "MAX_REGEX_PROGRAM_SIZE",
    "MAX_REGEX_RULES",
    "MAX_REGEX_TOTAL_PROGRAM_SIZE",
    "DetectorRule",
    "DlpEngine",
    "DlpPolicy",
    "InvalidPattern",
    "KeywordList",
    "RegexRule",
    "compile_regex",
    "luhn_valid",
]

CATEGORY = "dlp"

#: Regex rules in force in one scope (config and commands, global, space and room together).
MAX_REGEX_RULES = 100
#: RE2 program size of one pattern (``(?i)\btkt-[0-9]{5}\b`` is 18; counted repetitions
#: such as ``[A-Za-z0-9]{32,64}`` cost about 8 per repetition).
MAX_REGEX_PROGRAM_SIZE = 1_000
#: Sum of the RE2 program sizes of the regex rules in force in one scope.
MAX_REGEX_TOTAL_PROGRAM_SIZE = 10_000
# Matched regex rules per scan searched again for their (masked) excerpt; the others report
# no excerpt. One search of a 60 KB message can cost milliseconds with a heavy pattern.
_MAX_EXCERPT_SEARCHES = 2


# --- rules ---------------------------------------------------------------------------------


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
    """

    name: str
    keywords: tuple[str, ...]
    actions: frozenset[Action] = frozenset({Action.BLOCK})
    whole_word: bool = True

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

    def __post_init__(self) -> None:
        if self.name not in DETECTORS:
            raise ValueError(
                f"unknown DLP detector {self.name!r}; expected one of {sorted(DETECTORS)}"
            )
        object.__setattr__(
            self, "actions", _coerce_actions(self.actions, f"detector {self.name!r}")
        )


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


# --- regex compilation ---------------------------------------------------------------------


class InvalidPattern(ValueError):
    """A pattern RE2 refuses; ``reason`` is RE2's own explanation."""

    def __init__(self, reason: str, pattern: str = "") -> None:
        self.reason = reason
        self.pattern = pattern
        super().__init__(f"invalid pattern {pattern!r}: {reason}" if pattern else reason)


def _options(max_mem: int = 8 << 20) -> re2.Options:
    options = re2.Options()
    options.log_errors = False
    options.max_mem = max_mem
    return options


def compile_regex(pattern: str) -> re2._Regexp:
    """Compile an admin-supplied pattern with RE2 (linear time), never Python ``re``.

    Raises :class:`InvalidPattern` with RE2's reason for what RE2 rejects (backreferences,
    lookaround, syntax errors, patterns too large), for patterns whose RE2 program is larger
    than :data:`MAX_REGEX_PROGRAM_SIZE` (they cost the gate time on every message) and for
    patterns that match the empty string, which would match every message.
    """
    if not isinstance(pattern, str) or not pattern:
        raise InvalidPattern("the pattern is empty", "")
    try:
        compiled = re2.compile(pattern, _options())
    except re2.error as exc:
        reason = exc.args[0] if exc.args else "rejected by RE2"
        if isinstance(reason, bytes):
            reason = reason.decode("utf-8", "replace")
        raise InvalidPattern(str(reason), pattern) from None
    except (TypeError, UnicodeError) as exc:
        raise InvalidPattern(str(exc), pattern) from None
    if compiled.programsize > MAX_REGEX_PROGRAM_SIZE:
        raise InvalidPattern(
            f"it is too complex (RE2 program size {compiled.programsize}, at most"
            f" {MAX_REGEX_PROGRAM_SIZE} allowed, so that every message stays fast to check);"
            " use smaller repetition counts such as {8,} instead of {32,64}, or split it",
            pattern,
        )
    if compiled.search("") is not None:
        raise InvalidPattern("it matches empty text, so it would match every message", pattern)
    return compiled


# --- masking -------------------------------------------------------------------------------


def _stars(n: int) -> str:
    return " ".join("*" * min(4, n - i) for i in range(0, n, 4))


def _mask_text(text: str) -> str:
    """Keep the first and last character of longer matches, star the rest."""
    if len(text) <= 4:
        return "*" * len(text)
    return text[0] + "*" * (len(text) - 2) + text[-1]


def _mask_token(token: str, prefix: str) -> str:
    return f"{prefix}{'*' * 8}" if token.startswith(prefix) else "*" * 8


# --- detectors -----------------------------------------------------------------------------

_DOUBLED = (0, 2, 4, 6, 8, 1, 3, 5, 7, 9)


def luhn_valid(digits: str) -> bool:
    """Luhn checksum of an ASCII digit string."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        total += _DOUBLED[d] if i & 1 else d
    return total % 10 == 0


_DIGIT_RUN = r"[0-9]+(?:[ -][0-9]+)*"


def _digit_groups(data: bytes) -> Iterable[list[bytes]]:
    for m in _DIGIT_RUN_RE.finditer(data):
        yield m.group().replace(b"-", b" ").split(b" ")


def _card_excerpt(digits: bytes) -> str | None:
    n = len(digits)
    text = digits.decode("ascii")
    if 13 <= n <= 19 and luhn_valid(text) and text.count(text[0]) != n:
        return f"{text[:4]} {_stars(n - 8)} {text[-4:]}"
    return None


def _find_card(data: bytes) -> str | None:
    """A Luhn-valid card number anywhere in a run of digit groups.

    A run is digits with single spaces or dashes between groups (``qty 2 4111-1111-1111-1111``,
    ``4111 1111 1111 1111 12/26``, ``5500 0000 0000 0004 123``). A card is

    * the whole run, if it has 13-19 digits in at most 5 groups (``4111 1111 1111 1111``,
      ``411 11111 1111 1111``) or in groups of one size but the last (``4 1 1 1 ...``,
      ``41 11 11 ...``, written to get around the detector) -- while a list of small
      numbers (``12 7 33 5 18 ...``) is not a card;
    * one whole group of 13-19 digits (written without separators) inside the run;
    * consecutive whole groups inside the run, written the way cards are: a first group of
      4 digits, middle groups of 4 or 6, a last group of 3-6 (``4-4-4-4``, ``4-6-5`` Amex,
      ``4-6-4`` Diners, ``4-4-4-4-3``), so phone numbers and dates side by side do not form
      a "card" out of pieces of several numbers.

    A card never starts or ends inside a group: the 20-digit order number
    ``41111111111111111111`` is not searched for 16-digit windows. The price of finding a
    card followed by more digits: a 17-19 digit number grouped by 4 whose first 16 digits
    pass Luhn is reported too (it reads like a card and a CVC).
    """
    for groups in _digit_groups(data):
        total = sum(map(len, groups))
        if total < 13:
            continue
        count = len(groups)
        if total <= 19 and (count <= 5 or len({len(g) for g in groups[:-1]}) == 1):
            excerpt = _card_excerpt(b"".join(groups))
            if excerpt is not None:
                return excerpt
        if count == 1:
            continue
        for i, first in enumerate(groups):
            size = len(first)
            if size != 4:
                if 13 <= size <= 19:
                    excerpt = _card_excerpt(first)
                    if excerpt is not None:
                        return excerpt
                continue
            # Longest first: a 19-digit card written 4-4-4-4-3 reads like a 16-digit card
            # and a CVC; both are tried.
            candidates = []
            digits = first
            for j in range(i + 1, count):
                group = groups[j]
                digits += group
                if len(digits) > 19:
                    break
                if len(digits) >= 13 and 3 <= len(group) <= 6:
                    candidates.append(digits)
                if len(group) not in (4, 6):  # only the last group has another length
                    break
            for digits in reversed(candidates):
                excerpt = _card_excerpt(digits)
                if excerpt is not None:
                    return excerpt
    return None


def _find_ssn(data: bytes) -> str | None:
    for groups in _digit_groups(data):
        for i in range(len(groups) - 2):
            area, group, serial = groups[i], groups[i + 1], groups[i + 2]
            if len(area) != 3 or len(group) != 2 or len(serial) != 4:
                continue
            if area in (b"000", b"666") or area[:1] == b"9":
                continue
            if group == b"00" or serial == b"0000":
                continue
            return f"***-**-{serial.decode('ascii')}"
    return None


_IBAN_LENGTHS: dict[str, int] = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22,
    "BI": 27, "BR": 29, "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DJ": 27,
    "DK": 18, "DO": 28, "EE": 20, "EG": 29, "ES": 24, "FI": 18, "FK": 18, "FO": 18, "FR": 27,
    "GB": 22, "GE": 22, "GI": 23, "GL": 18, "GR": 27, "GT": 28, "HR": 21, "HU": 28, "IE": 22,
    "IL": 23, "IQ": 23, "IS": 26, "IT": 27, "JO": 30, "KW": 30, "KZ": 20, "LB": 28, "LC": 32,
    "LI": 21, "LT": 20, "LU": 20, "LV": 21, "LY": 25, "MC": 27, "MD": 24, "ME": 22, "MK": 19,
    "MN": 20, "MR": 27, "MT": 31, "MU": 30, "NI": 28, "NL": 18, "NO": 15, "OM": 23, "PK": 24,
    "PL": 28, "PS": 29, "PT": 25, "QA": 29, "RO": 24, "RS": 22, "RU": 33, "SA": 24, "SC": 31,
    "SD": 18, "SE": 24, "SI": 19, "SK": 24, "SM": 27, "SO": 23, "ST": 25, "SV": 28, "TL": 23,
    "TN": 24, "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20, "YE": 30,
}  # fmt: skip
_IBAN_RUN = r"\b[A-Za-z]{2}[0-9]{2}(?: ?[A-Za-z0-9])+"
_IBAN_PREFILTER = r"\b[A-Za-z]{2}[0-9]{2}(?: ?[A-Za-z0-9]){11}"


def _iban_at(chunk: str, start: int) -> str | None:
    """The IBAN starting at ``chunk[start]`` (single spaces allowed inside), if valid."""
    length = _IBAN_LENGTHS.get(chunk[start : start + 2].upper())
    if length is None:
        return None
    chars: list[str] = []
    pos = start
    while pos < len(chunk) and len(chars) < length:
        ch = chunk[pos]
        if ch != " ":
            chars.append(ch)
        pos += 1
    if len(chars) != length or (pos < len(chunk) and chunk[pos] != " "):
        return None
    iban = "".join(chars).upper()
    rearranged = iban[4:] + iban[:4]
    try:
        number = int("".join(str(int(c, 36)) for c in rearranged))
    except ValueError:
        return None
    return iban if number % 97 == 1 else None


def _find_iban(data: bytes) -> str | None:
    for m in _IBAN_RUN_RE.finditer(data):
        chunk = m.group().decode("ascii")
        starts = [0] + [i + 1 for i, ch in enumerate(chunk) if ch == " "]
        for start in starts:
            head = chunk[start : start + 4]
            if len(head) == 4 and head[:2].isalpha() and head[2:].isdigit():
                iban = _iban_at(chunk, start)
                if iban is not None:
                    return f"{iban[:4]} {_stars(len(iban) - 6)} {iban[-2:]}"
    return None


_PK_HEADER = r"-----BEGIN (?:[A-Z0-9]+ ){0,3}PRIVATE KEY(?: BLOCK)?-----"


def _find_private_key(data: bytes) -> str | None:
    for m in _PK_HEADER_RE.finditer(data):
        end = m.end()
        # Key material (a base64 run) follows, or the block is closed by its END line.
        if _B64_RUN_RE.search(data, end, end + 600) is not None or b"-----END " in data[end:]:
            return f"{m.group().decode('ascii')} [key material hidden]"
    return None


def _token_finder(pattern: str, prefixes: tuple[str, ...]) -> Callable[[bytes], str | None]:
    def find(data: bytes) -> str | None:
        m = _compiled(pattern).search(data)
        if m is None:
            return None
        token = m.group().decode("ascii")
        prefix = next((p for p in prefixes if token.startswith(p)), "")
        return _mask_token(token, prefix)

    return find


_JWT = r"\beyJ[A-Za-z0-9_-]{4,}={0,2}\.[A-Za-z0-9_-]+={0,2}\.[A-Za-z0-9_-]*"


def _find_jwt(data: bytes) -> str | None:
    for m in _JWT_RE.finditer(data):
        header_b64 = m.group().split(b".", 1)[0].rstrip(b"=")
        try:
            padded = header_b64 + b"=" * (-len(header_b64) % 4)
            header = json.loads(base64.urlsafe_b64decode(padded))
        except (ValueError, binascii.Error):
            continue
        if isinstance(header, dict) and isinstance(header.get("alg"), str):
            alg = header["alg"]
            alg = alg if alg.isalnum() and len(alg) <= 16 else "?"
            return f"eyJ**** (JWT, alg={alg})"
    return None


_COMPILED: dict[str, re2._Regexp] = {}


def _compiled(pattern: str) -> re2._Regexp:
    regex = _COMPILED.get(pattern)
    if regex is None:
        regex = _COMPILED[pattern] = re2.compile(pattern, _options())
    return regex


_DIGIT_RUN_RE = _compiled(_DIGIT_RUN)
_IBAN_RUN_RE = _compiled(_IBAN_RUN)
_PK_HEADER_RE = _compiled(_PK_HEADER)
_B64_RUN_RE = _compiled(r"[A-Za-z0-9+/=]{40,}")
_JWT_RE = _compiled(_JWT)

_AWS = r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b"
_GITHUB = r"\b(?:gh[pousr]_[A-Za-z0-9]{36,251}|github_pat_[A-Za-z0-9_]{22,255})\b"
_SLACK = r"\bxox[abprs]-[A-Za-z0-9]+-[A-Za-z0-9-]{8,250}"


@dataclass(frozen=True, slots=True)
class _Detector:
    prefilter: str  # cheap RE2 pattern that every true hit matches
    find: Callable[[bytes], str | None]  # validator: masked excerpt of the first real hit
    what: str  # "it appears to contain ..."
    secret: bool  # a credential: tell the sender to revoke it


DETECTORS: Mapping[str, _Detector] = {
    "card": _Detector(
        r"[0-9](?:[ -]?[0-9]){12}", _find_card, "a payment card number", secret=False
    ),
    "iban": _Detector(_IBAN_PREFILTER, _find_iban, "a bank account number (IBAN)", False),
    "us_ssn": _Detector(
        r"[0-9]{3}[ -][0-9]{2}[ -][0-9]{4}", _find_ssn, "a US social security number", False
    ),
    "private_key": _Detector(_PK_HEADER, _find_private_key, "a private key", secret=True),
    "aws_access_key": _Detector(
        _AWS, _token_finder(_AWS, ("AKIA", "ASIA")), "an AWS access key", secret=True
    ),
    "github_token": _Detector(
        _GITHUB,
        _token_finder(_GITHUB, ("github_pat_", "ghp_", "gho_", "ghu_", "ghs_", "ghr_")),
        "a GitHub token",
        secret=True,
    ),
    "slack_token": _Detector(
        _SLACK,
        _token_finder(_SLACK, ("xoxa-", "xoxb-", "xoxp-", "xoxr-", "xoxs-")),
        "a Slack token",
        secret=True,
    ),
    "jwt": _Detector(_JWT, _find_jwt, "a JSON Web Token (a login credential)", secret=True),
}


# --- words ---------------------------------------------------------------------------------

# ``_`` is not a word character: ``_nightingale_`` is Markdown emphasis, shown as the word, and
# a codename inside an identifier (``falcon_prod_db``) is still the codename.
_ASCII_WORD = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
# Scripts written without spaces between words: their letters never form a word boundary.
_NO_SPACE_SCRIPTS = (
    (0x0E00, 0x0EFF),  # Thai, Lao
    (0x1000, 0x109F),  # Myanmar
    (0x1780, 0x17FF),  # Khmer
    (0x3040, 0x30FF),  # Hiragana, Katakana
    (0x3400, 0x4DBF),  # CJK extension A
    (0x4E00, 0x9FFF),  # CJK unified ideographs
    (0xF900, 0xFAFF),  # CJK compatibility ideographs
    (0xFF66, 0xFF9F),  # half-width Katakana
    (0x20000, 0x3FFFF),  # CJK extensions B..
)


def _is_word(ch: str) -> bool:
    """Whether ``ch`` continues a word (letters, digits, combining marks; not ``_``)."""
    if ch < "\x80":
        return ch in _ASCII_WORD
    cp = ord(ch)
    for lo, hi in _NO_SPACE_SCRIPTS:
        if lo <= cp <= hi:
            return False
    if ch.isalnum():
        return True
    return unicodedata.category(ch)[0] == "M"


# --- messages ------------------------------------------------------------------------------


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

    def finding(self, excerpt: str) -> Finding:
        return Finding(
            rule=self.rule,
            category=CATEGORY,
            actions=self.actions,
            message=_message(self.rule, self.what, self.actions, self.secret),
            excerpt=excerpt,
        )


class DlpEngine:
    """A :class:`DlpPolicy` compiled for fast scanning. Immutable once built; thread-safe."""

    __slots__ = (
        "_automaton",
        "_detectors",
        "_exempt_rooms",
        "_exempt_servers",
        "_exempt_users",
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
        self._regexes: list[re2._Regexp] = []
        self._regex_rules: list[int] = []
        self._regex_set: Any = None
        self._detectors: list[tuple[int, _Detector]] = []
        self._set_detectors: Any = None
        self._exempt_users: frozenset[str] = frozenset()
        self._exempt_servers: frozenset[str] = frozenset()
        self._exempt_rooms: frozenset[str] = frozenset()

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

        entries: dict[str, list[_Entry]] = {}
        for klist in policy.keyword_lists:
            index = add_rule(
                _Rule(
                    f"keyword:{klist.name}",
                    klist.actions,
                    f"a term from the keyword list {klist.name!r}",
                    secret=False,
                )
            )
            for position, keyword in enumerate(klist.keywords):
                norm = normalize(keyword)
                if not norm:
                    raise ValueError(
                        f"keyword list {klist.name!r}: keyword #{position + 1} ({keyword!r}) is"
                        " empty after normalization"
                    )
                whole = klist.whole_word
                left, right = whole and _is_word(norm[0]), whole and _is_word(norm[-1])
                entry = (index, len(norm), left, right)
                bucket = entries.setdefault(norm, [])
                if not any(e[0] == index for e in bucket):
                    bucket.append(entry)
        if entries:
            automaton = ahocorasick.Automaton()
            for norm, bucket in entries.items():
                automaton.add_word(norm, tuple(bucket))
            automaton.make_automaton()
            engine._automaton = automaton

        if len(policy.regex_rules) > MAX_REGEX_RULES:
            raise ValueError(
                f"too many DLP regex rules: {len(policy.regex_rules)} apply here, at most"
                f" {MAX_REGEX_RULES} are allowed (config file and commands, all scopes"
                " together); combine patterns with | or remove unused ones"
            )
        if policy.regex_rules:
            regex_set = re2.Set.SearchSet(_options(64 << 20))
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
            detector_set = re2.Set.SearchSet(_options())
            for det in policy.detectors:
                spec = DETECTORS[det.name]
                index = add_rule(_Rule(f"detector:{det.name}", det.actions, spec.what, spec.secret))
                engine._detectors.append((index, spec))
                detector_set.Add(spec.prefilter)
            detector_set.Compile()
            engine._set_detectors = detector_set

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

    def check(self, event: Mapping[str, Any]) -> Verdict:
        """Judge one client-format event: exemptions, then :meth:`scan` of its texts."""
        if not isinstance(event, Mapping):
            return ALLOW
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
            if not isinstance(raw, str) or not raw:
                continue
            cleaned = clean(raw)
            if not cleaned:
                continue
            if self._automaton is not None:
                self._scan_keywords(fold(cleaned), found)
            if self._regexes:
                self._scan_regexes(cleaned, found, excerpt_searches)
                if raw != cleaned:
                    self._scan_regexes(raw, found, excerpt_searches)
            if self._detectors:
                self._scan_detectors(cleaned.encode("utf-8", "replace"), found)
        if not found:
            return ()
        return tuple(self._rules[i].finding(found[i]) for i in sorted(found))

    def _scan_keywords(self, text: str, found: dict[int, str]) -> None:
        last = len(text) - 1
        for end, bucket in self._automaton.iter(text):
            for index, length, left, right in bucket:
                if index in found:
                    continue
                start = end - length + 1
                if left and start > 0 and _is_word(text[start - 1]):
                    continue
                if right and end < last and _is_word(text[end + 1]):
                    continue
                found[index] = _mask_text(text[start : end + 1])

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
                found[index] = _mask_text(m.group().decode("utf-8", "replace"))

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
