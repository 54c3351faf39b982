"""The command registry: tokenizing, parsing, groups, generated help."""

from __future__ import annotations

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from bridge.commands.catalog import build_registry
from bridge.commands.context import CommandContext
from bridge.commands.errors import CommandError
from bridge.commands.registry import (
    MAX_COMMAND_LENGTH,
    Arg,
    CommandGroup,
    CommandRegistry,
    Flag,
    tokenize,
)
from bridge.commands.replies import Reply
from bridge.commands.roles import Role

P = "!policy"


async def _handler(_ctx: CommandContext) -> Reply:
    return Reply.plain("ok")


def registry() -> CommandRegistry:
    r = CommandRegistry()
    r.command("status", summary="Show status", role=Role.AUDITOR)(_handler)
    r.command(
        "help",
        summary="Show help",
        role=Role.AUDITOR,
        args=[Arg("topic", rest=True, required=False)],
    )(_handler)
    r.command(
        "dlp",
        "add-keyword",
        summary="Block a <b>keyword</b> & more",
        args=[Arg("word")],
        flags=[Flag("action", value="ACTION", choices=("block", "redact")), Flag("dry-run")],
    )(_handler)
    r.command(
        "dlp", "add-regex", summary="Add a regex", args=[Arg("name"), Arg("pattern", rest=True)]
    )(_handler)
    r.command("dlp", "list", summary="List rules", role=Role.AUDITOR)(_handler)
    r.command("dlp", summary="DLP overview", role=Role.AUDITOR)(_handler)
    r.command(
        "retention",
        "set",
        summary="Set retention",
        args=[Arg("duration"), Arg("unit", required=False, choices=("days", "hours"))],
        flags=[Flag("scope", value="SCOPE")],
    )(_handler)
    return r


# -- tokenizing ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "tokens"),
    [
        ("status", ["status"]),
        ("  dlp   list  ", ["dlp", "list"]),
        ('dlp add-keyword "top secret"', ["dlp", "add-keyword", "top secret"]),
        ("dlp add-keyword 'top secret'", ["dlp", "add-keyword", "top secret"]),
        # Phones turn quotes typographic; they still group words.
        ("dlp add-keyword \u201ctop secret\u201d", ["dlp", "add-keyword", "top secret"]),
        ("dlp add-keyword \u2018top secret\u2019", ["dlp", "add-keyword", "top secret"]),
        # Backslashes are kept as typed: regex patterns need them.
        (r"dlp add-regex ssn \d{3}-\d{2}-\d{4}", ["dlp", "add-regex", "ssn", r"\d{3}-\d{2}-\d{4}"]),
        (r'dlp add-regex x "\bfoo\b"', ["dlp", "add-regex", "x", r"\bfoo\b"]),
        # '#' is not a comment.
        ("dlp add-keyword #project", ["dlp", "add-keyword", "#project"]),
        ("", []),
    ],
)
def test_tokenize(text: str, tokens: list[str]) -> None:
    assert tokenize(text) == tokens


def test_unbalanced_quote_is_a_clear_error() -> None:
    with pytest.raises(CommandError, match="check your quotes"):
        tokenize('dlp add-keyword "unterminated')


def test_very_long_input_is_refused_clearly() -> None:
    with pytest.raises(CommandError, match=r"too long \(10000 characters; at most 4000\)"):
        tokenize("x" * 10_000)
    # Exactly at the limit is still fine.
    assert tokenize("x" * MAX_COMMAND_LENGTH) == ["x" * MAX_COMMAND_LENGTH]


# -- parsing --------------------------------------------------------------------------------------


def parse(text: str) -> tuple[str, dict[str, object], dict[str, object]]:
    parsed = registry().parse(tokenize(text), P)
    return parsed.spec.name, parsed.args, parsed.flags


def test_flags_with_separate_and_inline_values_and_boolean_flags() -> None:
    assert parse("dlp add-keyword secret --action redact") == (
        "dlp add-keyword",
        {"word": "secret"},
        {"action": "redact"},
    )
    assert parse("dlp add-keyword --action=block secret --dry-run") == (
        "dlp add-keyword",
        {"word": "secret"},
        {"action": "block", "dry-run": True},
    )
    # A value that is a quoted phrase, and a flag value with '=' in it.
    assert parse('retention set 30 --scope="a = b"')[2] == {"scope": "a = b"}


def test_flag_choices_are_enforced() -> None:
    with pytest.raises(CommandError, match="--action must be one of block, redact, not 'explode'"):
        parse("dlp add-keyword secret --action explode")


def test_flag_missing_its_value_shows_usage() -> None:
    with pytest.raises(CommandError) as e:
        parse("dlp add-keyword secret --action")
    assert "--action needs a value" in str(e.value)
    assert f"Usage: {P} dlp add-keyword WORD [--action block|redact] [--dry-run]" in str(e.value)


def test_unknown_flag_shows_usage() -> None:
    with pytest.raises(
        CommandError, match=r"unknown option --force\. Usage: !policy dlp add-keyword"
    ):
        parse("dlp add-keyword secret --force")


def test_positional_choices_are_case_insensitive_and_normalised() -> None:
    assert parse("retention set 30 DAYS")[1] == {"duration": "30", "unit": "days"}
    assert parse("retention set 30")[1] == {"duration": "30"}
    with pytest.raises(CommandError, match="UNIT must be one of days, hours, not 'weeks'"):
        parse("retention set 30 weeks")


def test_missing_argument_names_it_and_shows_usage() -> None:
    with pytest.raises(CommandError) as e:
        parse("dlp add-keyword")
    assert str(e.value) == (
        f"missing WORD. Usage: {P} dlp add-keyword WORD [--action block|redact] [--dry-run]"
    )
    with pytest.raises(
        CommandError, match=r"missing PATTERN\. Usage: !policy dlp add-regex NAME PATTERN…"
    ):
        parse("dlp add-regex name-only")


def test_extra_arguments_are_refused_with_usage() -> None:
    with pytest.raises(CommandError) as e:
        parse("dlp add-keyword one two three")
    assert "unexpected 'two three'" in str(e.value)
    assert f"Usage: {P} dlp add-keyword WORD" in str(e.value)


def test_rest_argument_takes_every_remaining_word() -> None:
    assert parse(r"dlp add-regex card \d{4} \d{4}")[1] == {
        "name": "card",
        "pattern": r"\d{4} \d{4}",
    }
    assert parse("help")[1] == {}
    assert parse("help dlp add-keyword")[1] == {"topic": "dlp add-keyword"}


def test_longest_prefix_wins_for_multi_word_commands() -> None:
    # "dlp" alone is a command too; "dlp list" must not be read as "dlp" + argument.
    assert parse("dlp list")[0] == "dlp list"
    assert parse("dlp")[0] == "dlp"
    assert parse("DLP List")[0] == "dlp list"
    spec, used = registry().find(["dlp", "add-keyword", "x"])
    assert spec is not None and (spec.name, used) == ("dlp add-keyword", 2)


def test_unknown_command_suggests_the_closest_and_lists_groups() -> None:
    r = build_registry()
    with pytest.raises(CommandError) as e:
        r.parse(["stauts"], P)
    msg = str(e.value)
    assert msg.startswith("unknown command 'stauts'. Did you mean `!policy status`?")
    assert "Try `!policy help`" in msg
    groups = msg.split("(groups: ", 1)[1].rstrip(")").split(", ")
    assert {"dlp", "federation", "help", "status"} <= set(groups)
    assert groups == sorted(groups)

    with pytest.raises(CommandError, match=r"Did you mean `!policy dlp add-keyword`\?"):
        r.parse(["dlp", "ad-keyword", "x"], P)
    with pytest.raises(CommandError) as e:
        r.parse(["xyzzy"], P)
    assert "Did you mean" not in str(e.value)
    assert "unknown command 'xyzzy'" in str(e.value)


def test_a_group_without_subcommand_lists_the_group() -> None:
    r = build_registry()
    with pytest.raises(CommandError) as e:
        r.parse(["federation"], P)
    msg = str(e.value)
    assert msg.startswith("`!policy federation` needs a subcommand:")
    assert "`!policy federation allow`" in msg and "`!policy federation show`" in msg


def test_empty_command_says_what_to_do() -> None:
    with pytest.raises(CommandError, match=r"say what to do, e.g. `!policy help`"):
        registry().parse([], P)


def test_declaring_a_command_twice_or_with_an_unknown_role_is_refused() -> None:
    r = registry()
    with pytest.raises(ValueError, match="declared twice"):
        r.command("status", summary="again")(_handler)
    with pytest.raises(ValueError, match="unknown role 'root'"):
        r.command("x", summary="x", role="root")  # type: ignore[arg-type]
    # Two groups declaring the same words cannot both be included.
    group = CommandGroup()
    group.command("status", summary="again", role=Role.AUDITOR)(_handler)
    with pytest.raises(ValueError, match="declared twice"):
        r.include(group)


def test_a_group_returns_its_handlers_unchanged_and_keeps_their_specs() -> None:
    group = CommandGroup()
    assert group.command("a", "b", summary="s", role=Role.AUDITOR)(_handler) is _handler
    [spec] = group.specs
    assert (spec.name, spec.role, spec.handler) == ("a b", Role.AUDITOR, _handler)
    assert CommandRegistry([group]).find(["a", "b"]) == (spec, 2)


# -- roles and help ------------------------------------------------------------------------------


def test_help_lists_only_what_the_role_may_use() -> None:
    r = registry()
    admin = r.help(P, Role.ADMIN).text
    auditor = r.help(P, Role.AUDITOR).text
    assert "dlp add-keyword" in admin and "dlp add-keyword" not in auditor
    assert "dlp list" in admin and "dlp list" in auditor
    assert f"{P} retention set DURATION [days|hours] [--scope SCOPE]" in admin
    assert "Show status [auditor]" in auditor
    assert r.help(P, None).text == f"No commands match. Try `{P} help`."
    topic = r.help(P, Role.ADMIN, topic=["DLP"]).text
    assert "dlp add-regex" in topic and "retention" not in topic and "status" not in topic


def test_help_html_is_escaped() -> None:
    reply = registry().help(P, Role.ADMIN)
    assert "Block a &lt;b&gt;keyword&lt;/b&gt; &amp; more" in reply.html
    assert "<b>keyword" not in reply.html
    # The usage's NAME PATTERN… and the prefix appear inside <code>, escaped.
    assert "<code>!policy dlp add-regex NAME PATTERN…</code>" in reply.html
    # The plain text keeps the summary as written.
    assert "Block a <b>keyword</b> & more" in reply.text


def test_the_real_help_matches_the_declared_commands() -> None:
    r = build_registry()
    admin = r.help(P, Role.ADMIN)
    auditor = r.help(P, Role.AUDITOR)
    for spec in r.specs:
        assert spec.usage(P) in admin.text
        assert (spec.usage(P) in auditor.text) == (spec.role is Role.AUDITOR)
    assert "help" in {s.name for s in r.specs} and "status" in {s.name for s in r.specs}


# -- robustness -----------------------------------------------------------------------------------

WORDS = st.sampled_from(
    [
        "dlp",
        "add-keyword",
        "add-regex",
        "list",
        "status",
        "help",
        "retention",
        "set",
        "--action",
        "--action=",
        "--scope",
        "--dry-run",
        "--",
        "-",
        '"',
        "'",
        "\u201c",
        "\\",
        "days",
        "block",
    ]
)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_tokenize_and_parse_raise_only_command_errors_on_any_text(text: str) -> None:
    r = registry()
    try:
        r.parse(tokenize(text), P)
    except CommandError:
        pass


@settings(max_examples=500, deadline=None)
@given(st.lists(st.one_of(WORDS, st.text(max_size=8)), max_size=8))
def test_parse_raises_only_command_errors_on_command_like_tokens(tokens: list[str]) -> None:
    r = registry()
    try:
        parsed = r.parse(tokens, P)
    except CommandError:
        return
    # Whatever parsed is bound to declared arguments and flags only.
    assert set(parsed.args) <= {a.name for a in parsed.spec.args}
    assert set(parsed.flags) <= {f.name for f in parsed.spec.flags}


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=60))
def test_a_quoted_phrase_is_one_token(phrase: str) -> None:
    # Typographic quotes are read as straight ones (phones type them): a phrase keeps
    # every other character as typed.
    assume(not {'"', "\u201c", "\u201d"} & set(phrase))
    expected = phrase.replace("\u2018", "'").replace("\u2019", "'")
    assert tokenize(f'dlp add-keyword "{phrase}"') == ["dlp", "add-keyword", expected]
