"""Tests for bridge.policy.dlp."""

from __future__ import annotations

import base64
import json
import re
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from bridge.policy.dlp import (
    DETECTORS,
    MAX_REGEX_PROGRAM_SIZE,
    MAX_REGEX_RULES,
    MAX_REGEX_TOTAL_PROGRAM_SIZE,
    DetectorRule,
    DlpEngine,
    DlpPolicy,
    InvalidPattern,
    KeywordList,
    RegexRule,
    compile_regex,
    luhn_valid,
)
from bridge.policy.dlp.detectors import _IBAN_LENGTHS
from bridge.policy.model import Action, Verdict
from bridge.policy.normalize import clean

T = TypeVar("T")

CARD = "4111 1111 1111 1111"
IBAN_GB = "GB82 WEST 1234 5698 7654 32"
IBAN_DE = "DE89 3704 0044 0532 0130 00"
PEM = (
    "-----BEGIN RSA PRIVATE KEY-----\n"
    "MIIEowIBAAKCAQEAx3Vd0gFJ8xQZ1n2m3o4p5q6r7s8t9u0v1w2x3y4z5A6B7C8D9E0F\n"
    "-----END RSA PRIVATE KEY-----"
)


def jwt(header: dict[str, Any]) -> str:
    def enc(obj: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    return f"{enc(header)}.{enc({'sub': '1234567890'})}.c2lnbmF0dXJlX2J5dGVz"


def all_detectors(actions: Action = Action.BLOCK) -> tuple[DetectorRule, ...]:
    return tuple(DetectorRule(name, frozenset({actions})) for name in DETECTORS)


def engine(**kwargs: Any) -> DlpEngine:
    return DlpEngine.compile(DlpPolicy(**kwargs))


def rules(findings: Any) -> set[str]:
    return {f.rule for f in findings}


DET = engine(detectors=all_detectors())


# --- compile_regex ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "reason_part"),
    [
        (r"(a)\1", "invalid escape"),
        (r"foo(?=bar)", "invalid perl operator"),
        (r"(?<!x)y", "invalid perl operator"),
        (r"[abc", "missing ]"),
        (r"a**", "bad repetition"),
        (r"x*", "empty"),
        ("", "empty"),
    ],
)
def test_compile_regex_rejects(pattern: str, reason_part: str) -> None:
    with pytest.raises(InvalidPattern) as info:
        compile_regex(pattern)
    assert reason_part in info.value.reason


def finishes(fn: Callable[[], T], seconds: float = 120.0) -> T:
    """Run ``fn`` in a daemon thread and return its result; fail if it is not back after
    ``seconds`` (a hang guard, not a timing: generous on a loaded machine). The thread is a
    daemon, so a hung call cannot keep the suite from failing or the process from exiting."""
    result: list[T] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            result.append(fn())
        except BaseException as e:  # re-raised in the test thread
            errors.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"did not finish within {seconds}s: it hangs"
    if errors:
        raise errors[0]
    return result[0]


def test_finishes_fails_on_a_hang_instead_of_waiting() -> None:
    never = threading.Event()
    with pytest.raises(AssertionError, match="did not finish"):
        finishes(never.wait, seconds=0.2)
    never.set()


def test_catastrophic_pattern_is_linear() -> None:
    regex = compile_regex(r"(a+)+$")
    text = "a" * 100_000 + "!"
    # A hang guard, not a timing: backtracking engines need years for this input.
    assert finishes(lambda: regex.search(text)) is None
    assert regex.search("aaa") is not None


def test_invalid_regex_rule_names_rule() -> None:
    with pytest.raises(InvalidPattern, match="regex rule 'bad'"):
        engine(regex_rules=(RegexRule("bad", r"(x)\1"),))


def test_regex_program_size_is_capped() -> None:
    assert compile_regex(r"(?i)api[_-]?key\s*[:=]\s*[A-Za-z0-9]{32,64}").programsize <= (
        MAX_REGEX_PROGRAM_SIZE
    )
    with pytest.raises(InvalidPattern, match="too complex") as info:
        compile_regex(r"(?s)[a-h].{400}Z")
    assert f"at most {MAX_REGEX_PROGRAM_SIZE}" in info.value.reason
    with pytest.raises(InvalidPattern, match="regex rule 'big': it is too complex"):
        engine(regex_rules=(RegexRule("big", "[a-z]{1000}"),))


def test_regex_rule_count_and_total_size_are_capped() -> None:
    small = tuple(RegexRule(f"r{i}", f"tkt-{i:03d}") for i in range(MAX_REGEX_RULES))
    assert len(engine(regex_rules=small).policy.regex_rules) == MAX_REGEX_RULES
    with pytest.raises(ValueError, match=f"too many DLP regex rules: {MAX_REGEX_RULES + 1}"):
        engine(regex_rules=(*small, RegexRule("one-more", "x")))
    heavy = compile_regex(r"(?s)[a-h].{100}[0-3]Z").programsize
    count = MAX_REGEX_TOTAL_PROGRAM_SIZE // heavy + 1
    assert count <= MAX_REGEX_RULES
    rules_ = tuple(RegexRule(f"h{i}", rf"(?s)[a-h].{{100}}[0-3]Z{i}") for i in range(count))
    with pytest.raises(ValueError, match="too complex together"):
        engine(regex_rules=rules_)
    assert engine(regex_rules=rules_[:-2]).policy.regex_rules == rules_[:-2]


def test_many_matching_regex_rules_are_all_reported_without_an_excerpt_search_each() -> None:
    # Each excerpt costs one more search of the whole text; beyond a few, the set's answer
    # is enough (the finding then carries no excerpt).
    patterns = tuple(RegexRule(f"r{i}", rf"(?s)[a-h].{{14}}[0-3]Z{i}\b") for i in range(60))
    eng = engine(regex_rules=patterns)
    text = "abcdefgh0123 " * 4_000 + " ".join(f"a{'b' * 14}0Z{i}" for i in range(60))
    findings = finishes(lambda: eng.scan([text]))
    assert rules(findings) == {f"regex:r{i}" for i in range(60)}
    with_excerpt = [f for f in findings if f.excerpt]
    assert 1 <= len(with_excerpt) < 10


# --- rule validation --------------------------------------------------------------------------


def test_actions_coercion() -> None:
    assert KeywordList("k", ("a",), Action.WARN).actions == frozenset({Action.WARN})  # type: ignore[arg-type]
    assert RegexRule("r", "x", ["audit", "notify"]).actions == {Action.AUDIT, Action.NOTIFY}  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown action 'nuke'"):
        DetectorRule("card", "nuke")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least one"):
        DetectorRule("card", frozenset())


def test_unknown_detector() -> None:
    with pytest.raises(ValueError, match="unknown DLP detector 'cc'"):
        DetectorRule("cc")


def test_duplicate_and_empty() -> None:
    with pytest.raises(ValueError, match="defined twice"):
        engine(keyword_lists=(KeywordList("a", ("x",)), KeywordList("a", ("y",))))
    with pytest.raises(ValueError, match="empty after normalization"):
        engine(keyword_lists=(KeywordList("a", ("ok", "\u200b ")),))
    with pytest.raises(ValueError, match="keywords must be a list"):
        KeywordList("a", "single string")  # type: ignore[arg-type]


def test_bad_exemption_patterns() -> None:
    for bad in ("alice", "@al*ce:x.org", "@*:*.org"):
        with pytest.raises(ValueError, match="exempt user"):
            engine(exempt_users=frozenset({bad}))


# --- keywords -------------------------------------------------------------------------------

KW = engine(
    keyword_lists=(
        KeywordList("codenames", ("Project Falcon", "bluebird", "c++", "机密")),
        KeywordList("fragments", ("xq7",), frozenset({Action.WARN}), whole_word=False),
    )
)


@pytest.mark.parametrize(
    "text",
    [
        "the bluebird plan",
        "BLUEBIRD!",
        "blue\u200bbird",  # zero-width space
        "ｂｌｕｅｂｉｒｄ",  # full-width
        "BlUeBiRd",
        "project   falcon",  # extra spaces in a phrase
        "project\n\tFalcon.",
        "Project\u00a0Falcon",
        "(bluebird)",
        "we use c++ here",
        "这是机密文件",  # CJK: no spaces between words
        "b\u0336l\u0336u\u0336e\u0336bird",
        "_bluebird_",  # Markdown emphasis: shown as the word
        "__bluebird__ now",
        "bluebird_x",  # an identifier still carries the codename
        "blu\u0435bird",  # Cyrillic е inside a Latin word
        "BLUЕBIRD",  # Cyrillic Е
    ],
)
def test_keyword_found(text: str) -> None:
    assert rules(KW.scan([text])) == {"keyword:codenames"}


@pytest.mark.parametrize(
    "text",
    ["bluebirds", "thebluebird", "bluebird2", "project falconry", "projectfalcon", "c"],
)
def test_whole_word_respected(text: str) -> None:
    assert "keyword:codenames" not in rules(KW.scan([text]))


def test_substring_mode() -> None:
    findings = KW.scan(["abcXQ7def"])
    assert rules(findings) == {"keyword:fragments"}
    assert findings[0].actions == frozenset({Action.WARN})


def test_keyword_inside_html_inline_tags() -> None:
    event = {
        "type": "m.room.message",
        "content": {"body": "x", "formatted_body": "<b>blue</b>bird"},
    }
    assert KW.check(event).blocked
    event["content"] = {"body": "x", "formatted_body": "<p>blue</p><p>bird</p>"}
    assert not KW.check(event).findings


def test_same_keyword_in_two_lists() -> None:
    eng = engine(
        keyword_lists=(
            KeywordList("a", ("alpha",)),
            KeywordList("b", ("ALPHA", "beta"), frozenset({Action.AUDIT})),
        )
    )
    assert rules(eng.scan(["Alpha"])) == {"keyword:a", "keyword:b"}


def test_finding_message_and_excerpt_hide_match() -> None:
    (finding,) = KW.scan(["leaking bluebird now"])
    assert finding.category == "dlp"
    assert finding.rule == "keyword:codenames"
    assert "bluebird" not in finding.message.lower()
    assert "bluebird" not in finding.excerpt
    assert "codenames" in finding.message
    assert "blocked" in finding.message
    assert finding.errcode == "M_FORBIDDEN"


letters = st.text(alphabet="abcdefghij .,!?\n", max_size=80)
invisible = st.sampled_from(["\u200b", "\u200c", "\u200d", "\u2060", "\ufeff", "\u00ad", "\u034f"])


@given(letters, letters, st.lists(st.tuples(st.integers(0, 8), invisible), max_size=6))
@settings(max_examples=300)
def test_keyword_with_random_zero_width_is_found(
    before: str, after: str, inserts: list[tuple[int, str]]
) -> None:
    word = list("zorbflux")
    for pos, ch in sorted(inserts, reverse=True):
        word.insert(pos, ch)
    text = f"{before} {''.join(word)} {after}"
    eng = engine(keyword_lists=(KeywordList("k", ("ZorbFlux",)),))
    assert rules(eng.scan([text])) == {"keyword:k"}


# --- regex rules ----------------------------------------------------------------------------


def test_regex_rules() -> None:
    eng = engine(
        regex_rules=(
            RegexRule("ticket", r"(?i)\btkt-[0-9]{5}\b", frozenset({Action.NOTIFY})),
            RegexRule("two-lines", r"BEGIN\nEND"),
        )
    )
    assert rules(eng.scan(["see TKT-12345"])) == {"regex:ticket"}
    assert rules(eng.scan(["see ｔｋｔ-１２３４５"])) == {"regex:ticket"}  # NFKC'd text
    assert rules(eng.scan(["see tkt-\u200b12345"])) == {"regex:ticket"}  # invisibles removed
    assert rules(eng.scan(["BEGIN\nEND"])) == {"regex:two-lines"}  # raw text too
    assert eng.scan(["tkt-1234"]) == ()
    (finding,) = eng.scan(["TKT-99999"])
    assert "99999" not in finding.excerpt and "99999" not in finding.message


# --- detectors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "rule", "excerpt"),
    [
        (f"my card is {CARD}, thanks", "detector:card", "4111 **** **** 1111"),
        ("4111-1111-1111-1111", "detector:card", "4111 **** **** 1111"),
        ("4111111111111111", "detector:card", "4111 **** **** 1111"),
        ("ＣＡＲＤ４１１１１１１１１１１１１１１１", "detector:card", "4111 **** **** 1111"),
        ("4111\u200b1111\u200b1111\u200b1111", "detector:card", "4111 **** **** 1111"),
        (f"ref 2024 {CARD} 12/29", "detector:card", "4111 **** **** 1111"),
        ("amex 3782 822463 10005", "detector:card", "3782 **** *** 0005"),
        # A card next to other digits: expiry, CVC, quantity, list number.
        ("4111 1111 1111 1111 12/26", "detector:card", "4111 **** **** 1111"),
        ("5500 0000 0000 0004 123", "detector:card", "5500 **** **** 0004"),
        ("qty 2 4111-1111-1111-1111", "detector:card", "4111 **** **** 1111"),
        ("1 4111 1111 1111 1111", "detector:card", "4111 **** **** 1111"),
        ("4111111111111111 123", "detector:card", "4111 **** **** 1111"),
        ("2024-4111111111111111", "detector:card", "4111 **** **** 1111"),
        ("3782 822463 10005 0425", "detector:card", "3782 **** *** 0005"),
        # Unicode dashes and digits, odd groupings that try to get around the detector.
        ("4111\u20131111\u20141111\u22121111", "detector:card", "4111 **** **** 1111"),
        ("4111\u20111111\u20111111\u20111111", "detector:card", "4111 **** **** 1111"),
        (" ".join(["\u0664\u0661\u0661\u0661"] + ["\u0661" * 4] * 3), "detector:card",
         "4111 **** **** 1111"),  # Arabic-Indic
        ("\u096a" + "\u0967" * 15, "detector:card", "4111 **** **** 1111"),  # Devanagari
        ("4 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1", "detector:card", "4111 **** **** 1111"),
        ("41 11 11 11 11 11 11 11", "detector:card", "4111 **** **** 1111"),
        ("411 11111 1111 1111", "detector:card", "4111 **** **** 1111"),
        (f"iban: {IBAN_GB}.", "detector:iban", "GB82 **** **** **** **** 32"),
        (IBAN_DE.replace(" ", ""), "detector:iban", "DE89 **** **** **** **** 00"),
        (IBAN_DE.lower(), "detector:iban", "DE89 **** **** **** **** 00"),
        ("ssn 123-45-6789", "detector:us_ssn", "***-**-6789"),
        ("ssn 123 45 6789", "detector:us_ssn", "***-**-6789"),
        ("ssn 123\u201345\u20136789", "detector:us_ssn", "***-**-6789"),
        (PEM, "detector:private_key", "-----BEGIN RSA PRIVATE KEY----- [key material hidden]"),
        ("AKIAIOSFODNN7EXAMPLE", "detector:aws_access_key", "AKIA********"),
        ("key=ASIAY34FZKBOKMUTVV7A;", "detector:aws_access_key", "ASIA********"),
        ("ghp_" + "A1b2" * 9, "detector:github_token", "ghp_********"),
        ("github_pat_11ABCDEFG0" + "x" * 60, "detector:github_token", "github_pat_********"),
        ("xoxb-123456789012-1234567890123-AbCdEfGhIjKl", "detector:slack_token", "xoxb-********"),
        ("Authorization: Bearer " + jwt({"alg": "HS256", "typ": "JWT"}), "detector:jwt",
         "eyJ**** (JWT, alg=HS256)"),
    ],
)  # fmt: skip
def test_detector_hits(text: str, rule: str, excerpt: str) -> None:
    findings = DET.scan([text])
    assert rules(findings) == {rule}
    assert findings[0].excerpt == excerpt


@pytest.mark.parametrize(
    "block",
    [
        PEM.replace("RSA", "EC"),
        PEM.replace("RSA", "OPENSSH"),
        PEM.replace("RSA PRIVATE KEY", "PGP PRIVATE KEY BLOCK"),
        PEM.replace("RSA ", ""),
        PEM.replace("RSA", "ENCRYPTED"),
    ],
)
def test_private_key_kinds(block: str) -> None:
    assert rules(DET.scan([block])) == {"detector:private_key"}


@pytest.mark.parametrize(
    "text",
    [
        "4111 1111 1111 1112",  # Luhn fails
        "0000 0000 0000 0000",  # placeholder
        "order 41111111111111111111",  # 20 digits, no grouping: not a card
        "order 411111111111111111111 4111",  # a card never starts inside a group
        # Numbers side by side do not form a card out of their pieces (old behaviour: each
        # of these was flagged, a Luhn-valid window of whole groups was found in each).
        "lotto 7 3 9 2 8 1 4 6 5 0 2 7 3 9 1 8 4 2 6 5",
        "scores 12 7 33 5 18 2 9 41 6 3 27 8 15 4 22",
        "phones 555 123 4567 555 987 6543",
        "dates 2024 06 01 2024 07 15 2025 01 02",
        "GB82 WEST 1234 5698 7654 33",  # mod-97 fails
        "GB82 WEST 1234 5698 7654 3",  # wrong length
        "XX82 WEST 1234 5698 7654 32",  # unknown country
        "000-12-3456",
        "666-12-3456",
        "900-12-3456",
        "123-00-4567",
        "123-45-0000",
        "1234-45-6789",  # not AAA-GG-SSSS
        "-----BEGIN RSA PRIVATE KEY----- is how the file starts",
        "-----BEGIN PUBLIC KEY----- MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAx",
        "AKIAIOSFODNN7EXAMPL",  # too short
        "xAKIAIOSFODNN7EXAMPLE",  # glued to a word
        "ghp_short",
        "xoxb-",
        "eyJub3RhbGciOiAxfQ.eyJzdWIiOiAxfQ.sig",  # header without alg
        "eyJ!!!!.abc.def",
        "plain chat about cards and keys 12:30 tomorrow",
    ],
)
def test_detector_misses(text: str) -> None:
    assert DET.scan([text]) == ()


def test_detector_messages() -> None:
    (finding,) = DET.scan(["ghp_" + "A1b2" * 9])
    assert "revoke" in finding.message
    assert "A1b2" not in finding.message
    assert "detector:github_token" in finding.message


def test_luhn() -> None:
    assert luhn_valid("4111111111111111")
    assert luhn_valid("79927398713")
    assert not luhn_valid("79927398710")


def luhn_complete(body: str) -> str:
    for check in "0123456789":
        if luhn_valid(body + check):
            return body + check
    raise AssertionError


def card_shaped_parts(groups: list[str]) -> list[str]:
    """Numbers of 13-19 digits made of consecutive groups that are not the whole run, in
    the shapes cards are written in: 4, then 4s or 6s, then a last group of 3-6 digits."""
    parts = []
    for i in range(len(groups)):
        for j in range(i + 1, len(groups)):
            window = groups[i : j + 1]
            digits = "".join(window)
            if (
                len(window) < len(groups)
                and 13 <= len(digits) <= 19
                and len(window[0]) == 4
                and all(len(g) in (4, 6) for g in window[1:-1])
                and 3 <= len(window[-1]) <= 6
            ):
                parts.append(digits)
    return parts


separators = st.sampled_from(["", " ", "-"])
# Text that stays digit- and dash-free once cleaned ("²" and "¼" become digits, "–" a dash).
surrounding = st.text(
    alphabet=st.characters(blacklist_categories=("Nd", "Cs"), blacklist_characters="-"),
    max_size=40,
).filter(lambda s: not re.search(r"[0-9-]", clean(s)))
# Other numbers right next to the card: expiry dates, CVCs, quantities, list numbers.
digit_groups = st.lists(st.text(alphabet="0123456789", min_size=1, max_size=6), max_size=3)
number_joiners = st.sampled_from([" ", "-", "/", ", ", " x ", ": "])


@st.composite
def cards(draw: st.DrawFn, valid: bool = True) -> tuple[str, str]:
    length = draw(st.integers(13, 19))
    body = draw(st.text(alphabet="0123456789", min_size=length - 1, max_size=length - 1))
    assume(len(set(body)) > 1)
    number = luhn_complete(body)
    if not valid:
        number = number[:-1] + str((int(number[-1]) + draw(st.integers(1, 9))) % 10)
    sep = draw(separators)
    groups = [number[i : i + 4] for i in range(0, len(number), 4)]
    return number, sep.join(groups)


@given(cards(), surrounding, surrounding)
@settings(max_examples=300)
def test_valid_cards_always_found_and_masked(card: tuple[str, str], pre: str, post: str) -> None:
    number, shown = card
    findings = DET.scan([f"{pre} {shown} {post}"])
    card_findings = [f for f in findings if f.rule == "detector:card"]
    assert len(card_findings) == 1
    excerpt = card_findings[0].excerpt
    # A bidi override around the number (U+202E) makes readers see it reversed; the scanner
    # reads what is displayed, so the excerpt may show the visual order.
    visual = number[::-1]
    assert re.sub(r"\D", "", excerpt) in {number[:4] + number[-4:], visual[:4] + visual[-4:]}
    assert number[4:-4] not in excerpt.replace(" ", "")
    assert visual[4:-4] not in excerpt.replace(" ", "")


CARD_LAYOUTS = ((4, 4, 4, 4), (4, 6, 5), (4, 6, 4), (4, 4, 4, 4, 3), (4, 4, 4, 3))


@st.composite
def written_cards(draw: st.DrawFn) -> tuple[str, str]:
    """Cards as people write them: the usual group layouts, or no separators at all."""
    layout = draw(st.sampled_from((*CARD_LAYOUTS, (13,), (15,), (16,), (19,))))
    body = draw(st.text(alphabet="0123456789", min_size=sum(layout) - 1,
                        max_size=sum(layout) - 1))  # fmt: skip
    assume(len(set(body)) > 1)
    number = luhn_complete(body)
    sep = draw(st.sampled_from([" ", "-"]))
    groups, pos = [], 0
    for size in layout:
        groups.append(number[pos : pos + size])
        pos += size
    return number, sep.join(groups)


@given(written_cards(), digit_groups, digit_groups, number_joiners, number_joiners, surrounding)
@settings(max_examples=500)
def test_valid_cards_next_to_other_numbers_are_found(
    card: tuple[str, str],
    before: list[str],
    after: list[str],
    join_before: str,
    join_after: str,
    text: str,
) -> None:
    number, shown = card
    pre = " ".join(before) + join_before if before else ""
    post = join_after + " ".join(after) if after else ""
    findings = DET.scan([f"{text} {pre}{shown}{post} {text}"])
    card_findings = [f for f in findings if f.rule == "detector:card"]
    assert len(card_findings) == 1
    # Another Luhn-valid number may be reported first; it is masked all the same.
    assert re.fullmatch(r"[0-9]{4} [* ]+ [0-9]{4}", card_findings[0].excerpt)
    assert number[4:-4] not in card_findings[0].excerpt.replace(" ", "")


@given(cards(valid=False), surrounding, surrounding)
@settings(max_examples=300)
def test_luhn_invalid_never_a_card(card: tuple[str, str], pre: str, post: str) -> None:
    _, shown = card
    # 17-19 digits grouped by 4 read like a 16-digit card and a short number next to it
    # (CVC, quantity): those card-shaped parts are judged too, so they must fail Luhn too.
    assume(not any(luhn_valid(part) for part in card_shaped_parts(re.split("[ -]", shown))))
    findings = DET.scan([f"{pre} {shown} {post}"])
    assert "detector:card" not in rules(findings)


def iban_check_digits(country: str, bban: str) -> str:
    number = int("".join(str(int(c, 36)) for c in bban + country + "00"))
    return f"{98 - number % 97:02d}"


@st.composite
def ibans(draw: st.DrawFn) -> tuple[str, str]:
    """(compact IBAN, as written: grouped by 4 or not, any case)."""
    country = draw(st.sampled_from(sorted(_IBAN_LENGTHS)))
    bban = draw(
        st.text(
            alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789",
            min_size=_IBAN_LENGTHS[country] - 4,
            max_size=_IBAN_LENGTHS[country] - 4,
        )
    )
    iban = country + iban_check_digits(country, bban) + bban
    shown = iban
    if draw(st.booleans()):
        shown = " ".join(iban[i : i + 4] for i in range(0, len(iban), 4))
    if draw(st.booleans()):
        shown = shown.lower()
    return iban, shown


words = st.lists(st.text(alphabet="abcdefghijklmnopqrstuvwxyz", min_size=1, max_size=8),
                 max_size=5).map(" ".join)  # fmt: skip
punctuation = st.sampled_from(["", ".", ",", ":", "!", ")", "\n"])


@given(ibans(), words, words, punctuation)
@settings(max_examples=300)
def test_valid_ibans_always_found_and_masked(
    iban: tuple[str, str], before: str, after: str, punct: str
) -> None:
    compact, shown = iban
    findings = DET.scan([f"{before} {shown}{punct} {after}"])
    [finding] = [f for f in findings if f.rule == "detector:iban"]
    assert finding.excerpt.replace(" ", "").replace("*", "") == compact[:4] + compact[-2:]
    assert compact[4:-2] not in finding.excerpt.replace(" ", "")


@given(ibans(), st.data(), words, words)
@settings(max_examples=300)
def test_ibans_failing_mod_97_are_never_found(
    iban: tuple[str, str], data: st.DataObject, before: str, after: str
) -> None:
    compact, _ = iban
    digits = [i for i, c in enumerate(compact) if i >= 2 and c.isdigit()]
    pos = data.draw(st.sampled_from(digits))
    wrong = str((int(compact[pos]) + data.draw(st.integers(1, 9))) % 10)
    broken = compact[:pos] + wrong + compact[pos + 1 :]  # one digit off: mod 97 always fails
    assert "detector:iban" not in rules(DET.scan([f"{before} {broken} {after}"]))


ssn_separators = st.sampled_from(["-", " "])


@st.composite
def ssns(draw: st.DrawFn, valid: bool = True) -> tuple[str, str]:
    """(serial, SSN as written). Invalid ones use an area, group or serial never issued."""
    area = draw(st.integers(1, 899).filter(lambda a: a != 666))
    group = draw(st.integers(1, 99))
    serial = draw(st.integers(1, 9999))
    if not valid:
        broken = draw(st.sampled_from(["area0", "area666", "area9", "group", "serial"]))
        if broken == "area0":
            area = 0
        elif broken == "area666":
            area = 666
        elif broken == "area9":
            area = draw(st.integers(900, 999))
        elif broken == "group":
            group = 0
        else:
            serial = 0
    sep1, sep2 = draw(ssn_separators), draw(ssn_separators)
    return f"{serial:04d}", f"{area:03d}{sep1}{group:02d}{sep2}{serial:04d}"


@given(ssns(), surrounding, surrounding)
@settings(max_examples=300)
def test_valid_ssns_always_found_and_masked(ssn: tuple[str, str], pre: str, post: str) -> None:
    serial, shown = ssn
    findings = DET.scan([f"{pre} {shown} {post}"])
    [finding] = [f for f in findings if f.rule == "detector:us_ssn"]
    assert finding.excerpt == f"***-**-{serial}"


@given(ssns(valid=False), surrounding, surrounding)
@settings(max_examples=300)
def test_never_issued_ssns_are_never_found(ssn: tuple[str, str], pre: str, post: str) -> None:
    _, shown = ssn
    assert "detector:us_ssn" not in rules(DET.scan([f"{pre} {shown} {post}"]))


# --- engine: events, exemptions -----------------------------------------------------------

FULL = engine(
    keyword_lists=(KeywordList("codenames", ("bluebird",)),),
    regex_rules=(RegexRule("ticket", r"TKT-[0-9]{5}", frozenset({Action.AUDIT})),),
    detectors=all_detectors(),
    exempt_users=frozenset({"@compliance:corp.example", "@*:trusted.example"}),
    exempt_rooms=frozenset({"!quarantine:corp.example"}),
)


def msg(body: str, sender: str = "@bob:corp.example", room: str = "!r:corp.example") -> dict:
    return {
        "type": "m.room.message",
        "sender": sender,
        "room_id": room,
        "event_id": "$e",
        "content": {"msgtype": "m.text", "body": body},
    }


def test_check_blocks_and_orders() -> None:
    verdict = FULL.check(msg(f"bluebird TKT-12345 {CARD}"))
    assert verdict.blocked
    assert [f.rule for f in verdict.findings] == ["keyword:codenames", "regex:ticket",
                                                  "detector:card"]  # fmt: skip
    assert verdict.first_block is not None and verdict.first_block.rule == "keyword:codenames"
    assert verdict.wants(Action.AUDIT)


def test_check_clean_message_allows() -> None:
    assert FULL.check(msg("lunch at noon?")) == Verdict()


def test_check_exemptions() -> None:
    assert not FULL.check(msg(CARD, sender="@compliance:corp.example")).findings
    assert not FULL.check(msg(CARD, sender="@anyone:trusted.example")).findings
    assert FULL.check(msg(CARD, sender="@anyone:untrusted.example")).blocked
    assert FULL.check(msg(CARD, sender="@x:evil.trusted.example")).blocked
    assert not FULL.check(msg(CARD, room="!quarantine:corp.example")).findings


def test_check_edit_and_poll_and_encrypted() -> None:
    edit = msg("* fixed")
    edit["content"]["m.new_content"] = {"body": f"card {CARD}"}
    assert FULL.check(edit).blocked
    poll = {
        "type": "org.matrix.msc3381.poll.start",
        "sender": "@bob:corp.example",
        "content": {
            "org.matrix.msc3381.poll.start": {
                "question": {"org.matrix.msc1767.text": "best bird?"},
                "answers": [{"id": "1", "org.matrix.msc1767.text": "Bluebird"}],
            }
        },
    }
    assert FULL.check(poll).blocked
    encrypted = {"type": "m.room.encrypted", "content": {"body": "bluebird"}}
    assert not FULL.check(encrypted).findings


def test_one_finding_per_rule() -> None:
    findings = FULL.scan([f"{CARD} and 5500 0000 0000 0004", "bluebird bluebird"])
    assert sorted(rules(findings)) == ["detector:card", "keyword:codenames"]


def test_empty_policy() -> None:
    eng = engine()
    assert eng.scan(["anything 4111 1111 1111 1111"]) == ()
    assert eng.check(msg("x")) == Verdict()


@pytest.mark.parametrize(
    ("filler", "tail", "rule"),
    [
        ("ab12 " * 40_000, "bluebird", "keyword:codenames"),
        ("1 " * 100_000, CARD, "detector:card"),  # one digit run of 100k groups
        ("1234 " * 50_000, CARD, "detector:card"),  # 4-digit groups: every one a start
        ("12 34 " * 20_000, "ssn 123-45-6789", "detector:us_ssn"),
        ("GB82 " * 40_000, IBAN_DE, "detector:iban"),
        ("-----BEGIN " * 20_000, PEM, "detector:private_key"),
        ("eyJaaaa." * 20_000, "\n" + jwt({"alg": "RS256"}), "detector:jwt"),
        ("TKT-1234 " * 20_000, "TKT-12345", "regex:ticket"),
    ],
)
def test_large_adversarial_message_completes_and_still_finds_the_secret(
    filler: str, tail: str, rule: str
) -> None:
    # Near the 256 KiB scan limit, shaped to make each detector do the most work; the real
    # secret comes last. A hang guard, no timing: the scan must return with the finding.
    verdict = finishes(lambda: FULL.check(msg(f"{filler} {tail}")))
    assert rule in rules(verdict.findings)
    assert not finishes(lambda: FULL.check(msg(filler))).findings  # no false alarm either


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40)
    | st.sampled_from([CARD, IBAN_GB, "bluebird", "<b>x</b>", "\ud800"]),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(
        st.sampled_from(["type", "content", "sender", "room_id", "body", "formatted_body",
                         "m.new_content", "m.text", "question", "answers", "m.poll.start",
                         "m.relates_to", "key", "name", "topic", "displayname"])
        | st.text(max_size=5),
        children,
        max_size=5,
    ),
    max_leaves=40,
)  # fmt: skip


@given(json_values)
@settings(max_examples=400)
def test_engine_never_raises_on_arbitrary_events(event: Any) -> None:
    verdict = FULL.check(event)
    assert isinstance(verdict, Verdict)


@given(st.sampled_from(["m.room.message", "m.sticker", "m.room.topic", "m.reaction"]), json_values)
@settings(max_examples=300)
def test_engine_never_raises_on_arbitrary_content(etype: str, content: Any) -> None:
    assert isinstance(FULL.check({"type": etype, "sender": "@a:b", "content": content}), Verdict)


# --- separators, windows and long inputs -----------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "4111.1111.1111.1111",
        "4111/1111/1111/1111",
        "4111 - 1111 - 1111 - 1111",
        "4111 / 1111 / 1111 / 1111 exp 12/26",
        "4111 . 1111 . 1111 . 1111",
        "4111--1111--1111--1111",
        "ref 7 4111.1111.1111.1111 ok",
    ],
)
def test_cards_with_any_common_separator(text: str) -> None:
    assert "detector:card" in rules(FULL.scan([text]))


@pytest.mark.parametrize(
    "text",
    [
        "+81-93-1973-3373 0171/4780-890",  # two phone numbers side by side
        "+44 20 7326 9936 0529/7893-179",
        "192.168.100.200 10.20.30.40 172.16.254.1",
        "2024.01.15 2025/02/16 12.04.2026",
        "v1.2.3.4.5.6.7.8.9.10.11.12.13",
    ],
)
def test_numbers_joined_by_mixed_separators_are_not_cards(text: str) -> None:
    assert "detector:card" not in rules(FULL.scan([text]))


@given(st.text(alphabet="0123456789", min_size=1, max_size=40), st.data())
def test_luhn_windows_agree_with_luhn(digits: str, data: st.DataObject) -> None:
    from bridge.policy.dlp.detectors import _luhn_values, _prefix_mod10

    values = _luhn_values(digits.encode())
    start = data.draw(st.integers(0, len(digits) - 1))
    end = data.draw(st.integers(start + 1, len(digits)))
    sums = _prefix_mod10(values[(end - 1) & 1])
    assert ((sums[end] - sums[start]) % 10 == 0) == luhn_valid(digits[start:end])


tag_soup = st.lists(
    st.sampled_from(
        ["<b>", "</b>", "<p>", "</p>", "<br>", "<br/>", "x", "y z", "&amp;", "<li>", "</li>",
         '<a href="u">', "</a>", '<img alt="t">', "<code>", "</code>", "<mx-reply>"]
    )
)  # fmt: skip


@given(tag_soup)
def test_long_html_is_reduced_like_short_html(parts: list[str]) -> None:
    from bridge.policy.normalize import _fast_html_to_text, html_to_text, normalize

    markup = "".join(parts)
    assert normalize(_fast_html_to_text(markup)) == normalize(html_to_text(markup))


def test_a_crafted_run_of_digit_groups_still_finds_the_card_at_its_end() -> None:
    # 10,000 4-digit groups, no window of which passes Luhn, then a card.
    groups = ["4000"]
    while len(groups) < 10_000:
        for n in range(10_000):
            candidate = f"{n:04d}"
            if not luhn_valid("".join(groups[-3:]) + candidate):
                groups.append(candidate)
                break
    text = " ".join(groups) + " " + CARD
    assert "detector:card" in rules(finishes(lambda: FULL.scan([text])))


SHORT = engine(keyword_lists=(KeywordList("short", ("cop", "секрет")),))


@pytest.mark.parametrize(
    ("text", "found"),
    [
        ("the сор is here", True),  # Cyrillic look-alikes in English text
        ("Сор в комнате, рос в саду.", False),  # a real Russian word that looks like "cop"
        ("Привет, the cоp is here", True),  # a word mixing scripts, even in Russian text
        ("Наш секрет здесь", True),  # a Russian keyword in Russian text
        ("the ceкрет is here", True),  # ... and spelt with Latin look-alikes
        ("СЕКРЕТ!", True),
    ],
)
def test_text_written_in_cyrillic_keeps_its_letters(text: str, found: bool) -> None:
    assert bool(SHORT.scan([text])) is found


@pytest.mark.parametrize(
    ("text", "rule"),
    [
        ("iban GB82 \u1e82\u00c9\u015aT 1234 5698 7654 32", "detector:iban"),  # precomposed
        ("key \u00c1KIAIOSFODNN7EXAMPL\u00c9", "detector:aws_access_key"),
        ("key A\u0301KIAIOSFODNN7EXAMPLE\u0301", "detector:aws_access_key"),  # combining
        ("\u202e1111 1111 1111 1114\u202c", "detector:card"),  # shown as 4111 ...
    ],
)
def test_accents_and_overrides_do_not_hide_secrets_from_detectors(text: str, rule: str) -> None:
    assert rule in rules(FULL.scan([text]))


@pytest.mark.parametrize(
    "text",
    [
        f"\u202e{CARD}",  # shown reversed; copied, it is the card
        f"order \u202e {CARD} \u202e",
        f"x \u202e{CARD}\u202c y",
        "\u202e0000 000000 0018",  # Hypothesis found this one (a Diners-length card)
    ],
)
def test_a_card_after_a_right_to_left_override_is_read_as_typed(text: str) -> None:
    assert rules(DET.scan([text])) == {"detector:card"}


def test_a_keyword_after_a_right_to_left_override_is_read_as_typed_and_as_shown() -> None:
    eng = engine(keyword_lists=(KeywordList("codenames", ("kingfisher",)),))
    assert rules(eng.scan(["launch \u202ekingfisher\u202c soon"])) == {"keyword:codenames"}
    assert rules(eng.scan(["launch \u202erehsifgnik\u202c soon"])) == {"keyword:codenames"}
    assert rules(eng.scan(["launch \u202ebird\u202c soon"])) == set()


def test_an_override_shown_as_typed_still_lets_regexes_read_the_typed_raw_text() -> None:
    # One overridden letter looks the same both ways; a pattern needing the line break (kept
    # only in the raw text) must still see the raw text without the controls (an
    # optimisation that skipped the typed reading when both orders read the same lost it).
    eng = engine(regex_rules=(RegexRule("two-lines", r"secret\nline"),))
    assert rules(eng.scan(["sec\u202er\u202cet\nline"])) == {"regex:two-lines"}
    assert rules(eng.scan(["sec\u202er\u202cet line"])) == set()


@given(st.binary(max_size=300).map(lambda b: bytes(x % 10 for x in b)))
def test_prefix_sums_mod_10_in_byte_lanes_agree_with_a_plain_sum(values: bytes) -> None:
    from bridge.policy.dlp.detectors import _prefix_mod10

    assert _prefix_mod10(values) == bytes(sum(values[:k]) % 10 for k in range(len(values) + 1))


_SEPARATOR_SAMPLES = [" ", "-", ".", "/", " - ", " / ", "./", "..", " .", "-- ", "/-/"]


@given(
    st.lists(st.text(alphabet="0123456789", min_size=1, max_size=7), min_size=2, max_size=12),
    st.lists(st.sampled_from(_SEPARATOR_SAMPLES), min_size=11, max_size=11),
    st.integers(2, 6),
)
def test_window_masks_agree_with_luhn_and_separator_kinds_one_window_at_a_time(
    groups: list[str], separators: list[str], n: int
) -> None:
    from itertools import accumulate

    from bridge.policy.dlp.detectors import _one_kind, _WindowMasks

    seps = [sep.encode() for sep in separators[: len(groups) - 1]]
    offsets = list(accumulate(map(len, groups), initial=0))
    failed = _WindowMasks("".join(groups).encode(), offsets, seps).failed(n)
    expected = bytes(
        0 if luhn_valid("".join(groups[i : i + n])) and _one_kind(seps[i : i + n - 1]) else 1
        for i in range(len(groups) - n + 1)
    )
    assert bytes(failed) == expected
