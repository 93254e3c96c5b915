"""gateway/auth.py: keys from the environment and a key file (reloaded), tenants, and the ASGI check itself."""

from __future__ import annotations

import os
import time

import pytest
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route, WebSocketRoute
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from gateway import auth
from gateway.auth import AuthMiddleware, KeyConfigError, KeyRing, key_digest


def write_keys(path, lines: list[str]) -> None:
    path.write_text("\n".join(lines) + "\n")
    st = path.stat()  # a rewrite within the same clock tick must still look changed
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))


def test_environment_keys_name_their_tenant_or_belong_to_default():
    ring = KeyRing("k1, alice:k2,,bob:k3")
    assert ring.enabled
    assert ring.tenant("k1").name == "default"
    assert (ring.tenant("k2").name, ring.tenant("k3").name) == ("alice", "bob")
    assert ring.tenant("alice:k2") is None and ring.tenant("nope") is None and ring.tenant(None) is None
    assert not KeyRing(None).enabled and not KeyRing("").enabled


def test_the_key_file_holds_digests_and_is_reloaded_when_it_changes(tmp_path, monkeypatch):
    monkeypatch.setattr(auth, "RELOAD_EVERY_S", 0.0)
    f = tmp_path / "keys"
    write_keys(f, ["# tenant sha256", f"alice {key_digest('ka')}", "", f"bob   {key_digest('kb')}  # rotated"])
    ring = KeyRing(key_file=str(f))
    assert ring.tenant("ka").name == "alice" and ring.tenant("kb").name == "bob"
    write_keys(f, [f"bob {key_digest('kb2')}"])  # alice revoked, bob rotated
    assert ring.tenant("ka") is None and ring.tenant("kb") is None and ring.tenant("kb2").name == "bob"
    write_keys(f, ["bob not-a-digest"])  # a broken rewrite keeps the keys in force
    assert ring.tenant("kb2").name == "bob"
    f.unlink()
    assert ring.tenant("kb2").name == "bob"


def test_the_key_file_is_checked_at_most_once_a_second(tmp_path):
    f = tmp_path / "keys"
    write_keys(f, [f"alice {key_digest('ka')}"])
    ring = KeyRing(key_file=str(f))
    write_keys(f, [])
    assert ring.tenant("ka").name == "alice"  # not re-read yet
    ring._checked = time.monotonic() - 2
    assert ring.tenant("ka") is None


@pytest.mark.parametrize("lines", [["alice"], ["alice 1234"], [f"alice {key_digest('x')} extra"]])
def test_a_malformed_key_file_stops_the_start(tmp_path, lines):
    f = tmp_path / "keys"
    write_keys(f, lines)
    with pytest.raises(KeyConfigError, match="keys:1"):
        KeyRing(key_file=str(f))
    with pytest.raises(KeyConfigError, match="cannot use the API key file"):
        KeyRing(key_file=str(tmp_path / "missing"))


def test_shared_caches_join_named_tenants_only():
    ring = KeyRing("a:ka,b:kb,c:kc", shared="b,a; c")
    assert ring.tenant("ka").cache == ring.tenant("kb").cache == "a+b"
    assert ring.tenant("kc").cache == "c"  # a group of one shares nothing


@pytest.mark.parametrize("name", ["team:red", "a+b", "x|once", "-lead", "é", "t" * 65])
def test_a_tenant_name_that_could_spell_another_tenants_keys_is_refused(tmp_path, name):
    """An outside tester read tenant "team:red"'s image through tenant "team" with uuid "red:<its uuid>" (the uuid
    key joined namespace and uuid with ":"); "a+b" would share the cache --shared-cache a,b makes."""
    f = tmp_path / "keys"
    write_keys(f, [f"{name} {key_digest('k')}"])
    with pytest.raises(KeyConfigError, match="tenant name"):
        KeyRing(key_file=str(f))
    if ":" not in name:
        with pytest.raises(KeyConfigError, match="tenant name"):
            KeyRing(f"{name}:k")
        with pytest.raises(KeyConfigError, match="tenant name"):
            KeyRing("ok:k", shared=f"ok,{name}")


def test_names_as_operators_write_them_are_taken():
    ring = KeyRing("alice:k1,svc.batch-2:k2,ops@example.com:k3,A_1:k4")
    assert [ring.tenant(k).name for k in ("k1", "k2", "k3", "k4")] == ["alice", "svc.batch-2", "ops@example.com", "A_1"]


def test_no_namespace_and_uuid_pair_spells_another_pairs_key():
    from cache.keys import Keys

    keys = Keys()
    pairs = [("team", "red:x"), ("team:red", "x"), ("", "4:team:x"), ("team", "x"), ("tea", "m:x")]
    assert len({keys.media_id("enc", uuid, ns) for ns, uuid in pairs}) == len(pairs)


@pytest.fixture
def client():
    async def whoami(request):
        tenant = request.state.tenant
        return JSONResponse({"tenant": tenant.name if tenant else None})

    async def ws(websocket):
        await websocket.accept()
        await websocket.send_json({"tenant": websocket.scope["state"]["tenant"].name})
        await websocket.close()

    app = Starlette(routes=[Route("/v1/models", whoami), Route("/health", whoami), Route("/ready", whoami),
                            Route("/metrics", whoami), WebSocketRoute("/v1/realtime", ws)])
    return TestClient(AuthMiddleware(app, KeyRing("alice:ka")))


def test_http_needs_a_bearer_key_except_the_probes(client):
    assert client.get("/v1/models", headers={"Authorization": "Bearer ka"}).json() == {"tenant": "alice"}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic ka"}, {"Authorization": "ka"}):
        r = client.get("/v1/models", headers=headers)
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
        assert r.json()["error"]["code"] == "invalid_api_key" and r.json()["error"]["type"] == "invalid_request_error"
        assert "ka" not in r.text.replace("invalid_api_key", "")
    assert client.get("/health").status_code == 200 and client.get("/ready").json() == {"tenant": None}
    assert client.get("/metrics").json() == {"tenant": None}  # Prometheus scrapes without a key


def test_the_websocket_takes_the_header_or_the_subprotocol_key(client):
    with client.websocket_connect("/v1/realtime", headers={"Authorization": "Bearer ka"}) as ws:
        assert ws.receive_json() == {"tenant": "alice"}
    with client.websocket_connect("/v1/realtime", subprotocols=["realtime", "openai-insecure-api-key.ka"]) as ws:
        assert ws.receive_json() == {"tenant": "alice"}
    for kwargs in ({}, {"headers": {"Authorization": "Bearer nope"}},
                   {"subprotocols": ["realtime", "openai-insecure-api-key.nope"]}):
        with pytest.raises(Exception) as info:
            with client.websocket_connect("/v1/realtime", **kwargs):
                pass
        denied = info.value
        if hasattr(denied, "status_code"):  # starlette's WebSocketDenialResponse: the handshake refused with a 401
            assert denied.status_code == 401 and denied.json()["error"]["code"] == "invalid_api_key"
        else:  # a server without the denial-response extension
            assert isinstance(denied, WebSocketDisconnect) and denied.code == 1008


def test_a_key_file_line_may_carry_its_tenants_rate_limits(tmp_path):
    f = tmp_path / "keys"
    write_keys(f, [f"alice {key_digest('ka')} rpm=5 tpm=1000", f"bob {key_digest('kb')}"])
    ring = KeyRing(key_file=str(f))
    assert (ring.tenant("ka").rpm, ring.tenant("ka").tpm) == (5, 1000)
    assert (ring.tenant("kb").rpm, ring.tenant("kb").tpm) == (None, None)
    write_keys(f, [f"alice {key_digest('ka')} burst=5"])
    with pytest.raises(KeyConfigError, match="unknown field 'burst=5'"):
        KeyRing(key_file=str(f))


def test_a_refused_key_is_logged_with_the_request_id_its_client_got(caplog):
    """An outside tester could not match a client's 401 to the gateway's record: it named no request id."""
    import logging

    from gateway.app import with_request_id

    app = Starlette(routes=[Route("/v1/models", lambda request: JSONResponse({}))])
    with caplog.at_level(logging.INFO, logger="gateway.auth"):
        r = TestClient(with_request_id(AuthMiddleware(app, KeyRing("alice:ka")))).get("/v1/models")
    assert r.status_code == 401
    assert [rec.request_id for rec in caplog.records if rec.msg == "unauthorized"] == [r.headers["x-request-id"]]


def test_a_flood_of_unauthorized_requests_logs_a_line_a_second(caplog):
    """Each 401 was a log line: keyless requests cost an attacker nothing and filled the logs. A line a second, with
    how many were not logged since the last."""
    import logging

    app = Starlette(routes=[Route("/v1/models", lambda request: JSONResponse({}))])
    client = TestClient(AuthMiddleware(app, KeyRing("alice:ka")))
    with caplog.at_level(logging.INFO, logger="gateway.auth"):
        assert {client.get("/v1/models").status_code for _ in range(50)} == {401}
    assert len([rec for rec in caplog.records if rec.msg == "unauthorized"]) == 1
