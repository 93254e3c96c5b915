"""CORS for the origins --allowed-origins names (gateway/origin.py): preflights of the OpenAI JS SDK pass, a refused
one is OpenAI-shaped, and pages of an allowed origin can read the rate-limit and request-id headers."""
from __future__ import annotations

from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from gateway.origin import CORS, BrowserGuard

ORIGIN = "https://app.example"


def _client() -> TestClient:
    async def chat(request):
        return JSONResponse({"ok": True}, headers={"x-request-id": "r1", "x-ratelimit-remaining-requests": "9"})

    app = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])
    return TestClient(BrowserGuard(CORS(app, [ORIGIN]), "0.0.0.0", allowed_origins=ORIGIN))


def test_the_js_sdks_preflight_passes_and_its_answer_headers_are_readable():
    client = _client()
    asked = "authorization, content-type, x-stainless-os, x-stainless-lang, openai-organization, x-client-request-id"
    pre = client.options("/v1/chat/completions", headers={
        "Origin": ORIGIN, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": asked})
    assert pre.status_code == 200, pre.text  # a fixed list of three headers refused it: "Disallowed CORS headers"
    assert pre.headers["access-control-allow-origin"] == ORIGIN
    assert {h.strip() for h in pre.headers["access-control-allow-headers"].lower().split(",")} >= {
        h.strip() for h in asked.split(",")}
    r = client.post("/v1/chat/completions", headers={"Origin": ORIGIN}, json={})
    exposed = {h.strip() for h in r.headers["access-control-expose-headers"].split(",")}
    assert {"x-request-id", "x-ratelimit-remaining-requests", "retry-after"} <= exposed


def test_a_refused_preflight_is_an_openai_shaped_400_and_a_foreign_origin_a_403():
    client = _client()
    pre = client.options("/v1/chat/completions", headers={"Origin": ORIGIN, "Access-Control-Request-Method": "PUT"})
    assert pre.status_code == 400 and pre.headers["content-type"] == "application/json"
    error = pre.json()["error"]
    assert error["code"] == "cors_not_allowed" and "method" in error["message"]
    foreign = client.options("/v1/chat/completions", headers={
        "Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
    assert foreign.status_code == 403 and foreign.json()["error"]["code"] == "origin_not_allowed"
