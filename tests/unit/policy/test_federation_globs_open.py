"""Federation: globs match in linear time; ``open`` mode opens the ACLs the bridge wrote."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.policy.federation import (
    FederationMode,
    FederationPolicy,
    acl_allows,
    acl_content,
    acl_matches,
    glob_matches,
    server_allowed,
)
from bridge.policy.rooms import RoomState, plan_room

OWN = "corp.example"
BOT = f"@policybot:{OWN}"


def in_subprocess(code: str, seconds: float = 120.0) -> str:
    """Run ``code`` in a fresh interpreter; fail if it is not done after ``seconds``.

    A hang guard, not a timing. A thread would not do: Python's backtracking ``re`` holds the
    GIL for the whole match, so the test could not even time out while it runs. The child
    is killed on timeout.
    """
    root = Path(__file__).resolve().parents[2]
    try:
        done = subprocess.run(
            [sys.executable, "-c", code],
            cwd=root,
            env={**os.environ, "PYTHONPATH": str(root)},
            capture_output=True,
            text=True,
            timeout=seconds,
            check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"glob matching did not finish within {seconds}s: it backtracks")
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_pathological_deny_glob_does_not_stall_an_invite() -> None:
    # A backtracking regex took 33 s for this deny glob against a 60-character name; the
    # name comes from the invitee's user ID, which any local user chooses. Server names go
    # up to 255 characters, with more stars it would take years.
    out = in_subprocess(
        textwrap.dedent(
            """
            from bridge.policy.federation import (
                FederationMode, FederationPolicy, check_invite, check_remote_join,
                glob_matches,
            )
            own = "corp.example"
            deny = FederationPolicy(FederationMode.DENYLIST, ("*a*a*a*a*a*a*a*b", "e.example"))
            print(bool(check_invite(deny, own, "@alice:" + own, "@x:" + "a" * 60).findings))
            print(check_invite(deny, own, "@alice:" + own, "@x:" + "a" * 60 + "b").blocked)
            many = FederationPolicy(FederationMode.ALLOWLIST, ("*a" * 40 + "*b",))
            print(check_remote_join(many, own, "@x:" + "a" * 255).blocked)
            print(glob_matches("*a" * 40 + "*b", "a" * 250 + "b"))
            """
        )
    )
    assert out.split() == ["False", "True", "True", "True"]


def fnmatch_reference(glob: str, name: str) -> bool:
    """The spec's glob semantics with Python's backtracking ``re`` (small inputs only)."""
    pattern = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in glob)
    return re.fullmatch(pattern, name, re.IGNORECASE | re.DOTALL) is not None


@given(
    st.text(alphabet="aAb.-*?[]+\\é:", max_size=10),
    st.text(alphabet="aAb.-[]+\\é", max_size=12),
)
@settings(max_examples=500)
def test_glob_matching_agrees_with_the_reference(glob: str, name: str) -> None:
    assert glob_matches(glob, name) is fnmatch_reference(glob, name)


def test_odd_characters_in_names_never_raise() -> None:
    assert glob_matches("*", "a\ud800b")
    assert not glob_matches("a.example", "a\ud800b")
    assert glob_matches("a?b", "a\ud800b")  # a lone surrogate counts as one character


# --- open mode ---------------------------------------------------------------------------

INTERNAL_ACL = {"allow": [OWN], "deny": [], "allow_ip_literals": False}
OPEN = FederationPolicy(FederationMode.OPEN)


def room(*acl: dict[str, Any]) -> RoomState:
    events: list[dict[str, Any]] = [
        {"type": "m.room.create", "state_key": "", "sender": f"@alice:{OWN}",
         "content": {"room_version": "10"}},
        {"type": "m.room.power_levels", "state_key": "",
         "content": {"users": {BOT: 100}, "users_default": 0}},
    ]  # fmt: skip
    events += [{"type": "m.room.server_acl", "state_key": "", "content": c} for c in acl]
    return RoomState.from_events(events)


def plan(state: RoomState, federation: FederationPolicy) -> Any:
    return plan_room(state, bot=BOT, own_server=OWN, federation=federation, retention=None)


def test_going_from_internal_to_open_lifts_the_restrictive_acl() -> None:
    desired = acl_content(OPEN, OWN)
    assert desired is not None
    assert not acl_matches(INTERNAL_ACL, desired)
    assert plan(room(INTERNAL_ACL), OPEN).set_state == (("m.room.server_acl", "", desired),)
    # The same for what allowlist and denylist mode wrote before.
    allowlist = acl_content(FederationPolicy(FederationMode.ALLOWLIST, ("p.example",)), OWN)
    denylist = acl_content(FederationPolicy(FederationMode.DENYLIST, ("evil.example",)), OWN)
    for old in (allowlist, denylist):
        assert old is not None and not acl_matches(old, desired)
    # Once written, the open ACL is in line.
    assert plan(room(INTERNAL_ACL, desired), OPEN).in_line


def test_open_mode_writes_no_acl_into_rooms_that_never_had_one() -> None:
    assert plan(room(), OPEN).in_line
    assert plan(room(), FederationPolicy(FederationMode.OPEN, allow_ip_literals=True)).in_line
    # ... while a restrictive mode does.
    assert plan(room(), FederationPolicy(FederationMode.INTERNAL)).set_state


def test_the_open_acl_agrees_with_the_gate() -> None:
    content = acl_content(OPEN, OWN)
    for server in ("any.example", "evil.example:8448", OWN, "1.2.3.4", "[::1]"):
        assert acl_allows(content, server) is server_allowed(OPEN, OWN, server)


def test_open_acl_on_a_homeserver_named_by_an_ip_address_lets_it_in() -> None:
    content = acl_content(OPEN, "10.0.0.1:8448")
    assert content is not None and content["allow_ip_literals"] is True
    assert acl_allows(content, "10.0.0.1:8448")


def test_a_cleared_acl_counts_as_none_in_the_drift_check() -> None:
    # The worker's drift check sees raw content; the planner reads {} as no ACL.
    desired = acl_content(OPEN, OWN)
    assert acl_matches({}, desired)
    assert not acl_matches({}, acl_content(FederationPolicy(FederationMode.INTERNAL), OWN))
