"""The transaction endpoint over real HTTP: auth, bad input, durability, idempotence."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from bridge.http.transactions import AppserviceAPI
from bridge.store import Store, StoreUnavailable

TOKEN = "hs-token-for-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def txn(*ids: str) -> dict:
    return {
        "events": [
            {
                "event_id": i,
                "room_id": "!r:x",
                "sender": "@a:x",
                "type": "m.room.message",
                "content": {"body": "x"},
            }
            for i in ids
        ]
    }


@pytest.fixture
async def client(store: Store) -> AsyncIterator[TestClient]:
    woken: list[int] = []
    refused: list[int] = []
    api = AppserviceAPI(
        store, TOKEN, on_committed=lambda: woken.append(1), on_refused=lambda: refused.append(1)
    )
    app = web.Application(client_max_size=64 * 1024)
    app.add_routes(api.routes())
    async with TestClient(TestServer(app)) as c:
        c.woken = woken  # type: ignore[attr-defined]
        c.refused = refused  # type: ignore[attr-defined]
        yield c


async def test_wrong_or_missing_token_stores_nothing(client: TestClient, store: Store) -> None:
    r = await client.put("/_matrix/app/v1/transactions/1", json=txn("$a"))
    assert r.status == 401 and (await r.json())["errcode"] == "M_UNAUTHORIZED"
    r = await client.put(
        "/_matrix/app/v1/transactions/1", json=txn("$a"), headers={"Authorization": "Bearer no"}
    )
    assert r.status == 403 and (await r.json())["errcode"] == "M_FORBIDDEN"
    # The legacy query token is refused unless configured.
    r = await client.put(f"/_matrix/app/v1/transactions/1?access_token={TOKEN}", json=txn("$a"))
    assert r.status == 401
    assert (await store.stats.snapshot()).events == 0


async def test_legacy_query_token_when_configured(store: Store) -> None:
    api = AppserviceAPI(store, TOKEN, allow_query_token=True)
    app = web.Application()
    app.add_routes(api.routes())
    async with TestClient(TestServer(app)) as c:
        r = await c.put("/_matrix/app/v1/transactions/q1?access_token=wrong", json=txn("$a"))
        assert r.status == 403 and (await r.json())["errcode"] == "M_FORBIDDEN"
        assert (await store.stats.snapshot()).events == 0
        r = await c.put(f"/_matrix/app/v1/transactions/q1?access_token={TOKEN}", json=txn("$a"))
        assert r.status == 200
        assert (await store.stats.snapshot()).events == 1


async def test_bad_bodies_get_matrix_errors(client: TestClient, store: Store) -> None:
    r = await client.put("/_matrix/app/v1/transactions/1", data=b"{nope", headers=AUTH)
    assert r.status == 400 and (await r.json())["errcode"] == "M_NOT_JSON"
    r = await client.put("/_matrix/app/v1/transactions/1", data=b"\xff\xfe", headers=AUTH)
    assert r.status == 400 and (await r.json())["errcode"] == "M_NOT_JSON"
    for body in ({"no_events": []}, {"events": "x"}, [1, 2], {"events": [1]}):
        r = await client.put("/_matrix/app/v1/transactions/1", json=body, headers=AUTH)
        assert r.status == 400 and (await r.json())["errcode"] == "M_BAD_JSON", body
    big = {"events": [{"event_id": "$big", "content": {"body": "x" * 100_000}}]}
    r = await client.put("/_matrix/app/v1/transactions/1", json=big, headers=AUTH)
    assert r.status == 413
    assert (await store.stats.snapshot()).events == 0
    # The txnId was not burnt by the failures: a good retry is stored.
    r = await client.put("/_matrix/app/v1/transactions/1", json=txn("$a"), headers=AUTH)
    assert r.status == 200 and await r.json() == {}
    assert (await store.stats.snapshot()).events == 1


async def test_retry_is_acknowledged_but_not_stored_twice(client: TestClient, store: Store) -> None:
    for _ in range(3):
        r = await client.put("/_matrix/app/v1/transactions/7", json=txn("$a", "$b"), headers=AUTH)
        assert r.status == 200
    r = await client.put("/_matrix/app/v1/transactions/8", json=txn("$b", "$c"), headers=AUTH)
    assert r.status == 200
    assert (await store.stats.snapshot()).events == 3
    assert len(client.woken) == 2  # type: ignore[attr-defined]


async def test_store_failure_answers_503_so_synapse_retries(
    client: TestClient, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(*_a: object, **_k: object) -> None:
        raise StoreUnavailable("database down")

    monkeypatch.setattr(store.queue, "ingest", broken)
    r = await client.put("/_matrix/app/v1/transactions/9", json=txn("$a"), headers=AUTH)
    assert r.status == 503
    assert (await r.json())["errcode"] == "M_UNKNOWN"
    assert client.refused == [1]  # type: ignore[attr-defined]  # the redelivery nudger is told
    assert client.woken == []  # type: ignore[attr-defined]


async def test_ping_and_queries(client: TestClient) -> None:
    r = await client.post("/_matrix/app/v1/ping", json={"transaction_id": "x"}, headers=AUTH)
    assert r.status == 200 and await r.json() == {}
    r = await client.post("/_matrix/app/v1/ping", json={})
    assert r.status == 401
    r = await client.get("/_matrix/app/v1/users/@a:x", headers=AUTH)
    assert r.status == 404 and (await r.json())["errcode"] == "M_NOT_FOUND"
    r = await client.get("/_matrix/app/v1/rooms/%23a:x", headers=AUTH)
    assert r.status == 404
    r = await client.get("/_matrix/app/v1/rooms/%23a:x")
    assert r.status == 401


async def test_body_is_parsed_not_trusted(client: TestClient, store: Store) -> None:
    deep = {"events": [{"event_id": "$d", "content": json.loads("[" * 50 + "]" * 50)}]}
    r = await client.put("/_matrix/app/v1/transactions/d", json=deep, headers=AUTH)
    assert r.status == 200
    assert (await store.stats.snapshot()).events == 1


async def test_absurdly_deep_json_is_a_client_error(client: TestClient, store: Store) -> None:
    body = b'{"events": [' + b"[" * 200_000 + b"]" * 200_000 + b"]}"
    r = await client.put("/_matrix/app/v1/transactions/deep", data=body, headers=AUTH)
    assert r.status in (400, 413)
    assert (await store.stats.snapshot()).events == 0
