"""Repeating the appservice ping after transient failures (bridge.matrix.ping_until_reached)."""

from __future__ import annotations

import pytest
from mautrix.errors import MatrixRequestError, make_request_error

from bridge.matrix import ping_is_transient, ping_until_reached


def failure(status: int, errcode: str) -> MatrixRequestError:
    return make_request_error(http_status=status, text="", errcode=errcode, message="failed")


class FakePing:
    """Fails with the given errors in turn, then answers with a round trip of 7 ms."""

    def __init__(self, *errors: MatrixRequestError) -> None:
        self.errors = list(errors)
        self.calls = 0

    async def __call__(self) -> int:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return 7


class Sleeps:
    def __init__(self) -> None:
        self.slept: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.slept.append(seconds)


@pytest.mark.parametrize(
    ("status", "errcode", "transient"),
    [
        (502, "M_CONNECTION_FAILED", True),  # Synapse could not reach us, or raced its retry
        (504, "M_CONNECTION_TIMEOUT", True),
        (502, "M_BAD_STATUS", True),  # we answered 503 while starting or stopping
        (403, "M_FORBIDDEN", False),  # wrong as_token: repeating will not help
        (400, "M_URL_NOT_SET", False),
    ],
)
def test_which_failures_are_worth_repeating(status: int, errcode: str, transient: bool) -> None:
    assert ping_is_transient(failure(status, errcode)) is transient


async def test_transient_failures_are_repeated_with_the_given_delays() -> None:
    ping = FakePing(failure(502, "M_CONNECTION_FAILED"), failure(504, "M_CONNECTION_TIMEOUT"))
    sleeps = Sleeps()
    assert await ping_until_reached(ping, delays=(1, 5, 9), sleep=sleeps) == (7, 3)
    assert sleeps.slept == [1, 5]
    assert ping.calls == 3


async def test_a_permanent_failure_is_raised_at_once() -> None:
    ping = FakePing(failure(403, "M_FORBIDDEN"))
    sleeps = Sleeps()
    with pytest.raises(MatrixRequestError) as info:
        await ping_until_reached(ping, delays=(1, 2), sleep=sleeps)
    assert info.value.errcode == "M_FORBIDDEN"
    assert sleeps.slept == []


async def test_gives_up_with_the_last_error_when_the_delays_run_out() -> None:
    ping = FakePing(*(failure(502, f"M_TRY_{i}") for i in range(5)))
    sleeps = Sleeps()
    with pytest.raises(MatrixRequestError) as info:
        await ping_until_reached(ping, delays=(1, 2), sleep=sleeps)
    assert info.value.errcode == "M_TRY_2"
    assert ping.calls == 3
    assert sleeps.slept == [1, 2]
