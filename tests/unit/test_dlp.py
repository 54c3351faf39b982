"""Tests for bridge.policy.dlp."""

from __future__ import annotations

import base64
import concurrent.futures
import json
import re
import unicodedata
from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from bridge.policy.dlp import (
    DETECTORS,
    DetectorRule,
    DlpEngine,
    DlpPolicy,
    InvalidPattern,
    KeywordList,
    RegexRule,
    compile_regex,
    luhn_valid,
)
from bridge.policy.model import Action, Verdict

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


def finishes(fn, seconds: float = 60.0):  # type: ignore[no-untyped-def]
    """Run ``fn`` in a thread; fail (instead of hanging the suite) if it never returns."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(fn).result(timeout=seconds)


def test_catastrophic_pattern_is_linear() -> None:
    regex = compile_regex(r"(a+)+$")
    text = "a" * 100_000 + "!"
    # A hang guard, not a timing: backtracking engines need years for this input.
    assert finishes(lambda: regex.search(text)) is None
    assert regex.search("aaa") is not None


def test_invalid_regex_rule_names_rule() -> None:
    with pytest.raises(InvalidPattern, match="regex rule 'bad'"):
        engine(regex_rules=(RegexRule("bad", r"(x)\1"),))


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
    ],
)
def test_keyword_found(text: str) -> None:
    assert rules(KW.scan([text])) == {"keyword:codenames"}


@pytest.mark.parametrize(
    "text",
    ["bluebirds", "thebluebird", "bluebird_x", "project falconry", "projectfalcon", "c"],
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
        (f"iban: {IBAN_GB}.", "detector:iban", "GB82 **** **** **** **** 32"),
        (IBAN_DE.replace(" ", ""), "detector:iban", "DE89 **** **** **** **** 00"),
        (IBAN_DE.lower(), "detector:iban", "DE89 **** **** **** **** 00"),
        ("ssn 123-45-6789", "detector:us_ssn", "***-**-6789"),
        ("ssn 123 45 6789", "detector:us_ssn", "***-**-6789"),
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


separators = st.sampled_from(["", " ", "-"])
# Text that stays digit- and dash-free after NFKC ("²" and "¼" become digits).
surrounding = st.text(
    alphabet=st.characters(blacklist_categories=("Nd", "Cs"), blacklist_characters="-"),
    max_size=40,
).filter(lambda s: not re.search(r"[0-9-]", unicodedata.normalize("NFKC", s)))


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
    assert re.sub(r"\D", "", excerpt) == number[:4] + number[-4:]
    assert number[4:-4] not in excerpt.replace(" ", "")


@given(cards(valid=False), surrounding, surrounding)
@settings(max_examples=300)
def test_luhn_invalid_never_a_card(card: tuple[str, str], pre: str, post: str) -> None:
    _, shown = card
    findings = DET.scan([f"{pre} {shown} {post}"])
    assert "detector:card" not in rules(findings)


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


def test_large_adversarial_message_is_fast() -> None:
    texts = [
        "ab12 " * 40_000,
        "1 " * 100_000,
        "-----BEGIN " * 20_000,
        "eyJaaaa." * 20_000,
        "4111 " * 50_000,
    ]
    for text in texts:
        finishes(lambda text=text: FULL.check(msg(text)))


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
