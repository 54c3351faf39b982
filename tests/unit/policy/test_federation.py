"""Federation policy: ACL semantics, ACL generation, gate checks."""

from __future__ import annotations

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from bridge.policy.federation import (
    FederationMode,
    FederationPolicy,
    FederationPolicyError,
    acl_allows,
    acl_content,
    acl_matches,
    check_federated_invite,
    check_invite,
    check_local_join,
    check_remote_join,
    glob_matches,
    is_ip_literal,
    members_to_remove,
    policy_problems,
    room_server,
    server_allowed,
    strip_port,
)
from bridge.policy.model import Action

OWN = "corp.example"


def policy(mode: str, *servers: str, ip: bool = False) -> FederationPolicy:
    return FederationPolicy(FederationMode(mode), servers, allow_ip_literals=ip)


# --- server names and globs ----------------------------------------------------------


@pytest.mark.parametrize(
    ("server", "host"),
    [
        ("a.example", "a.example"),
        ("a.example:8448", "a.example"),
        ("1.2.3.4:80", "1.2.3.4"),
        ("[::1]", "[::1]"),
        ("[2001:db8::1]:8448", "[2001:db8::1]"),
        ("localhost:8008", "localhost"),
        ("[::1]x", "[::1]x"),
        ("a.example:port", "a.example:port"),
    ],
)
def test_strip_port(server: str, host: str) -> None:
    assert strip_port(server) == host


@pytest.mark.parametrize(
    ("server", "literal"),
    [
        ("1.2.3.4", True),
        ("1.2.3.4:8448", True),
        ("[::1]", True),
        ("[2001:db8::1]:8448", True),
        ("a.example", False),
        ("1.2.3.4.example", False),
        ("1.2.3", False),
        ("999.1.1.1", False),
        ("localhost", False),
    ],
)
def test_is_ip_literal(server: str, literal: bool) -> None:
    assert is_ip_literal(server) is literal


@pytest.mark.parametrize(
    ("glob", "server", "matches"),
    [
        ("*.example.com", "matrix.example.com", True),
        ("*.example.com", "a.b.example.com", True),
        ("*.example.com", "example.com", False),
        ("*.example.com", "evilexample.com", False),
        ("*example.com", "example.com", True),  # * matches nothing too
        ("*", "", True),
        ("*", "anything.example", True),
        ("?.example", "a.example", True),
        ("?.example", "ab.example", False),
        ("?.example", ".example", False),
        ("a.example", "a.example:8448", True),  # port ignored
        ("A.Example", "a.example", True),  # case-insensitive, like Synapse
        ("a.example", "b.example", False),
        ("a.example", "a.example.evil", False),  # whole-name match
        ("a.exam+le", "a.example", False),  # regex metacharacters are literal
        ("a.example", "aXexample", False),  # "." is literal
        ("[::1]", "[::1]:8448", True),
        ("1.2.3.*", "1.2.3.4", True),
    ],
)
def test_glob_matches(glob: str, server: str, matches: bool) -> None:
    assert glob_matches(glob, server) is matches


# --- acl_allows: the spec's evaluation order -----------------------------------------


def test_acl_ip_literal_check_comes_first() -> None:
    content = {"allow": ["*"], "deny": [], "allow_ip_literals": False}
    assert not acl_allows(content, "1.2.3.4")
    assert not acl_allows(content, "[2001:db8::1]:8448")
    assert acl_allows(content, "a.example")
    assert acl_allows({**content, "allow_ip_literals": True}, "1.2.3.4")


def test_acl_deny_beats_allow() -> None:
    content = {"allow": ["evil.example", "*"], "deny": ["evil.example"]}
    assert not acl_allows(content, "evil.example")
    assert acl_allows(content, "good.example")


def test_acl_default_deny() -> None:
    assert not acl_allows({"allow": ["a.example"]}, "b.example")
    assert not acl_allows({}, "a.example")  # allow defaults to empty


def test_acl_defaults_and_malformed_fields() -> None:
    # allow_ip_literals defaults to true, also when not a boolean
    assert acl_allows({"allow": ["*"]}, "1.2.3.4")
    assert acl_allows({"allow": ["*"], "allow_ip_literals": "no"}, "1.2.3.4")
    # non-list allow/deny read as empty, non-string entries skipped
    assert not acl_allows({"allow": "*"}, "a.example")
    assert acl_allows({"allow": [1, "*"], "deny": "a.example"}, "a.example")
    # no ACL at all lets everyone in
    assert acl_allows(None, "1.2.3.4")


# --- acl_content ---------------------------------------------------------------------


def test_acl_content_by_mode() -> None:
    assert acl_content(policy("open"), OWN) == {
        "allow": ["*"],
        "deny": [],
        "allow_ip_literals": False,
    }
    assert acl_content(policy("open", "ignored.example", ip=True), OWN) == {
        "allow": ["*"],
        "deny": [],
        "allow_ip_literals": True,
    }
    assert acl_content(policy("internal"), OWN + ":8448") == {
        "allow": [OWN],
        "deny": [],
        "allow_ip_literals": False,
    }
    assert acl_content(policy("allowlist", "partner.example", "*.ally.example"), OWN) == {
        "allow": [OWN, "partner.example", "*.ally.example"],
        "deny": [],
        "allow_ip_literals": False,
    }
    assert acl_content(policy("denylist", "evil.example", ip=True), OWN) == {
        "allow": ["*"],
        "deny": ["evil.example"],
        "allow_ip_literals": True,
    }


def test_acl_content_deduplicates_own_server() -> None:
    content = acl_content(policy("allowlist", "CORP.example", "a.example", "a.example"), OWN)
    assert content is not None
    assert content["allow"] == [OWN, "a.example"]


def test_acl_content_refuses_lockout_by_deny_glob() -> None:
    bad = policy("denylist", "*.example")
    assert any("lock" in p for p in policy_problems(bad, OWN))
    with pytest.raises(FederationPolicyError, match=r"\*\.example.*own server"):
        acl_content(bad, OWN)


def test_acl_content_refuses_ip_literal_own_server() -> None:
    with pytest.raises(FederationPolicyError, match="allow_ip_literals"):
        acl_content(policy("internal"), "10.0.0.1:8448")
    content = acl_content(policy("internal", ip=True), "10.0.0.1:8448")
    assert content is not None and acl_allows(content, "10.0.0.1:8448")


def test_policy_problems_flags_ineffective_ip_entry() -> None:
    problems = policy_problems(policy("allowlist", "10.0.0.5"), OWN)
    assert problems and "never takes effect" in problems[0]
    assert policy_problems(policy("allowlist", "10.0.0.5", ip=True), OWN) == []
    assert policy_problems(policy("denylist", "evil.example"), OWN) == []


def test_acl_matches_is_order_and_case_insensitive() -> None:
    desired = {"allow": [OWN, "a.example"], "deny": [], "allow_ip_literals": False}
    assert acl_matches({"allow": ["A.example", OWN, OWN], "allow_ip_literals": False}, desired)
    assert not acl_matches({"allow": [OWN], "allow_ip_literals": False}, desired)
    assert not acl_matches({"allow": [OWN, "a.example"]}, desired)  # ip literals default true
    assert not acl_matches(None, desired)
    assert acl_matches({"anything": 1}, None)  # unmanaged
    open_acl = {"allow": ["*"], "deny": [], "allow_ip_literals": True}
    assert acl_matches(None, open_acl)


# --- policy validation ---------------------------------------------------------------


def test_policy_accepts_mode_strings_and_lists() -> None:
    p = FederationPolicy("allowlist", ["a.example"])  # type: ignore[arg-type]
    assert p.mode is FederationMode.ALLOWLIST
    assert p.servers == ("a.example",)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mode": "closed"}, "unknown federation mode 'closed'"),
        ({"mode": "allowlist", "servers": "a.example"}, "list of server names"),
        ({"mode": "allowlist", "servers": ("",)}, "empty or contains whitespace"),
        ({"mode": "allowlist", "servers": ("a example",)}, "whitespace"),
        ({"mode": "allowlist", "servers": ("a.example:8448",)}, "write 'a.example'"),
        ({"mode": "allowlist", "servers": ("[::1]:8448",)}, "write '\\[::1\\]'"),
        ({"mode": "allowlist", "servers": (5,)}, "must be strings"),
        ({"mode": "open", "allow_ip_literals": "yes"}, "true or false"),
    ],
)
def test_policy_validation(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(FederationPolicyError, match=message):
        FederationPolicy(**kwargs)  # type: ignore[arg-type]


# --- server_allowed ------------------------------------------------------------------


def test_server_allowed_by_mode() -> None:
    assert server_allowed(policy("open"), OWN, "any.example")
    assert not server_allowed(policy("open"), OWN, "1.2.3.4")
    assert server_allowed(policy("open", ip=True), OWN, "1.2.3.4")
    assert not server_allowed(policy("internal"), OWN, "any.example")
    allow = policy("allowlist", "*.partner.example")
    assert server_allowed(allow, OWN, "hs.partner.example:8448")
    assert not server_allowed(allow, OWN, "partner.example")
    deny = policy("denylist", "evil.example", "?.spam.example")
    assert not server_allowed(deny, OWN, "evil.example")
    assert not server_allowed(deny, OWN, "x.spam.example")
    assert server_allowed(deny, OWN, "xy.spam.example")
    assert not server_allowed(deny, OWN, "[::1]")


def test_own_server_always_allowed() -> None:
    assert server_allowed(policy("internal"), OWN, OWN)
    assert server_allowed(policy("internal"), OWN + ":8448", OWN)
    assert server_allowed(policy("denylist", "*"), OWN, OWN)
    assert server_allowed(policy("internal"), "10.0.0.1", "10.0.0.1")


# --- properties ----------------------------------------------------------------------

label = st.text(alphabet="abcxyz019-", min_size=1, max_size=6)
hostname = st.lists(label, min_size=1, max_size=4).map(".".join)
ipv4 = st.tuples(*[st.integers(0, 255)] * 4).map(lambda t: ".".join(map(str, t)))
ipv6 = st.sampled_from(["[::1]", "[2001:db8::1]", "[fe80::abcd]"])
host = st.one_of(hostname, hostname, ipv4, ipv6)
server = st.one_of(host, st.tuples(host, st.integers(1, 65535)).map(lambda t: f"{t[0]}:{t[1]}"))
glob = st.one_of(
    hostname,
    st.text(alphabet="abcxyz019-.*?", min_size=1, max_size=10),
    hostname.map(lambda h: "*." + h),
    ipv4,
    ipv6,
)
policies = st.builds(
    FederationPolicy,
    mode=st.sampled_from(list(FederationMode)),
    servers=st.lists(glob, max_size=5).map(tuple),
    allow_ip_literals=st.booleans(),
)


@given(policies, server)
def test_acl_never_locks_out_own_server(p: FederationPolicy, own: str) -> None:
    try:
        content = acl_content(p, own)
    except FederationPolicyError:
        # refused only for a real lockout, and then policy_problems says so
        assert any("lock" in problem for problem in policy_problems(p, own))
        return
    assert content is None or acl_allows(content, own)


@given(policies, server, server)
def test_acl_agrees_with_server_allowed(p: FederationPolicy, own: str, other: str) -> None:
    assume(not policy_problems(p, own))
    # An open ACL on a homeserver named by an IP address must let IP literals in.
    assume(p.mode is not FederationMode.OPEN or not is_ip_literal(own))
    content = acl_content(p, own)
    assert content is not None
    assert acl_allows(content, other) == server_allowed(p, own, other)


@given(policies, server)
def test_acl_matches_itself_in_any_order(p: FederationPolicy, own: str) -> None:
    assume(not policy_problems(p, own))
    content = acl_content(p, own)
    assert acl_matches(content, content)
    if content is not None:
        shuffled = {**content, "allow": content["allow"][::-1], "deny": content["deny"][::-1]}
        assert acl_matches(shuffled, content)


@given(policies, server, st.lists(server, max_size=8))
def test_members_to_remove_never_lists_own_users(
    p: FederationPolicy, own: str, servers: list[str]
) -> None:
    members = [f"@u{i}:{s}" for i, s in enumerate(servers)] + [f"@me:{own}"]
    removed = members_to_remove(p, own, members)
    assert f"@me:{own}" not in removed
    assert removed == [m for m in members if not server_allowed(p, own, m.partition(":")[2])]


# --- gate checks ---------------------------------------------------------------------

ALLOWLIST = policy("allowlist", "partner.example")


def test_check_invite_blocks_remote_invitee() -> None:
    verdict = check_invite(ALLOWLIST, OWN, f"@alice:{OWN}", "@mallory:evil.example")
    assert verdict.blocked
    finding = verdict.first_block
    assert finding is not None
    assert finding.category == "federation"
    assert finding.rule == "federation:allowlist"
    assert finding.actions == frozenset({Action.BLOCK})
    assert finding.errcode == "M_FORBIDDEN"
    assert "federation with evil.example is not allowed by company policy" in finding.message


def test_check_invite_allows_local_and_listed() -> None:
    assert not check_invite(ALLOWLIST, OWN, f"@alice:{OWN}", f"@bob:{OWN}").blocked
    assert not check_invite(ALLOWLIST, OWN, f"@alice:{OWN}", "@p:partner.example:8448").blocked
    assert not check_invite(policy("open"), OWN, f"@a:{OWN}", "@b:evil.example").findings


def test_check_invite_explains_ip_literals() -> None:
    verdict = check_invite(policy("open"), OWN, f"@alice:{OWN}", "@x:10.0.0.5:8448")
    assert verdict.blocked
    assert verdict.first_block is not None
    assert "IP address" in verdict.first_block.message


def test_check_federated_invite_uses_sender_server() -> None:
    event = {"type": "m.room.member", "sender": "@m:evil.example", "state_key": f"@a:{OWN}"}
    verdict = check_federated_invite(ALLOWLIST, OWN, event)
    assert verdict.blocked
    assert verdict.first_block is not None
    assert verdict.first_block.excerpt == "evil.example"
    ok = {**event, "sender": "@p:partner.example"}
    assert not check_federated_invite(ALLOWLIST, OWN, ok).blocked
    assert check_federated_invite(ALLOWLIST, OWN, {"type": "m.room.member"}).blocked
    assert not check_federated_invite(policy("open"), OWN, {}).blocked


def test_check_remote_join() -> None:
    assert check_remote_join(policy("internal"), OWN, "@x:partner.example").blocked
    assert not check_remote_join(ALLOWLIST, OWN, "@x:partner.example").blocked
    denied = check_remote_join(policy("denylist", "*.evil.example"), OWN, "@x:a.evil.example")
    assert denied.first_block is not None
    assert denied.first_block.rule == "federation:denylist"


def test_check_local_join() -> None:
    user = f"@alice:{OWN}"
    assert check_local_join(ALLOWLIST, OWN, user, "!room:evil.example").blocked
    assert not check_local_join(ALLOWLIST, OWN, user, "!room:partner.example").blocked
    assert not check_local_join(ALLOWLIST, OWN, user, f"!room:{OWN}").blocked
    assert not check_local_join(policy("internal"), OWN, user, f"!room:{OWN}:8448").blocked


def test_check_local_join_room_v12_id_cannot_decide() -> None:
    room = "!31hneApxJ_1o-63DmFrpeqnkFfWppnzWso1JvH3ogLM"
    assert room_server(room) is None
    assert check_local_join(policy("internal"), OWN, f"@alice:{OWN}", room).findings == ()


def test_room_server() -> None:
    assert room_server("!abc:b.example") == "b.example"
    assert room_server("!abc:b.example:8448") == "b.example:8448"
    assert room_server("!abc:") is None


def test_members_to_remove() -> None:
    members = [
        f"@a:{OWN}",
        "@b:partner.example",
        "@c:evil.example",
        "@c:evil.example",
        "@d:10.0.0.1",
    ]
    assert members_to_remove(ALLOWLIST, OWN, members) == ["@c:evil.example", "@d:10.0.0.1"]
    assert members_to_remove(policy("open", ip=True), OWN, members) == []
