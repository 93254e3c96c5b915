"""``/openapi.json``: the REST API described from the request models themselves (gateway/schemas.py), so the
description cannot drift from what the server accepts. The Realtime WebSocket is an event protocol, not REST: it
is described in the README, not here."""

from __future__ import annotations

import json

from gateway.schemas import _ASSISTANT_FIELDS, _NULL_MEANS_DEFAULT, _OFF_VALUES, ChatCompletionRequest

ERROR_CODES = {"400": "bad request (the message names the parameter)", "401": "missing, wrong or revoked API key",
               "403": "a web origin that is not allowed", "404": "no such model or route",
               "408": "the body did not arrive in time", "413": "request or media too large",
               "415": "a compressed body (Content-Encoding)",
               "500": "an internal error, named", "503": "overloaded, or a tier unavailable (Retry-After)"}


def _errors(*codes: str) -> dict:
    return {c: {"description": ERROR_CODES[c], "content": {"application/json": {
        "schema": {"$ref": "#/components/schemas/Error"}}}} for c in codes}


def openapi(model: str, version: str) -> dict:
    request = ChatCompletionRequest.model_json_schema(ref_template="#/components/schemas/{model}")
    schemas = request.pop("$defs", {})
    props = request["properties"]
    props["model"] = {"type": "string", "enum": [model], "description": "the served model"}
    # What parse_chat_request takes beyond the model: null for the fields whose default is not null, and the
    # parameters it does not implement, each only with the values that mean "off".
    for name in _NULL_MEANS_DEFAULT:
        props[name] = {"anyOf": [props[name], {"type": "null"}], "description": "null: the default"}
    for name, off in _OFF_VALUES.items():
        values = list({json.dumps(o): o for o in off}.values())  # 0 and 0.0 once
        props[name] = {"enum": values, "description": "not supported by this server: accepted only with a value "
                                                      "that asks for nothing"}
    message = schemas["ChatMessage"]["properties"]
    for name in _ASSISTANT_FIELDS:
        message[name] = {"anyOf": [{"type": "null"}, {"type": "array", "maxItems": 0}] if name != "annotations"
                         else [{"type": "null"}, {"type": "array"}],
                         "description": "assistant messages only, as the server sent them: dropped"}
    schemas["ChatCompletionRequest"] = request
    schemas["Error"] = {"type": "object", "required": ["error"], "properties": {"error": {
        "type": "object", "required": ["message", "type"], "properties": {
            "message": {"type": "string"}, "type": {"type": "string"},
            "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}
    open_route = {"security": []}
    probe = {"200": {"description": "ok", "content": {"application/json": {"schema": {"type": "object"}}}}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "Tributary", "version": version,
                 "description": f"OpenAI-compatible chat completions; this server serves '{model}'."},
        "components": {"schemas": schemas,
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "security": [{"bearer": []}],  # required only when the server is configured with API keys
        "paths": {
            "/v1/chat/completions": {"post": {
                "operationId": "createChatCompletion",
                "requestBody": {"required": True, "content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/ChatCompletionRequest"}}}},
                "responses": {
                    "200": {"description": "a chat completion, or with stream: true server-sent events", "content": {
                        "application/json": {"schema": {"type": "object"}},
                        "text/event-stream": {"schema": {"type": "string"}}}},
                    **_errors("400", "401", "403", "404", "408", "413", "415", "500", "503")}}},
            "/v1/models": {"get": {"operationId": "listModels", "responses": {
                "200": {"description": "the served model", "content": {"application/json": {
                    "schema": {"type": "object"}}}}, **_errors("401")}}},
            "/v1/models/{model}": {"get": {"operationId": "retrieveModel", "parameters": [
                {"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}], "responses": {
                "200": {"description": "the served model", "content": {"application/json": {
                    "schema": {"type": "object"}}}}, **_errors("401", "404")}}},
            "/health": {"get": {"operationId": "health", **open_route, "responses": probe}},
            "/ready": {"get": {"operationId": "ready", **open_route, "parameters": [
                {"name": "scope", "in": "query", "required": False, "description":
                 "cluster (default): ready once Redis answers and every tier has a live worker; gateway: ready while "
                 "this gateway serves (Redis answers), whatever workers are live",
                 "schema": {"type": "string", "enum": ["cluster", "gateway"], "default": "cluster"}}], "responses": {
                **probe, "503": {"description": "not ready: what is missing", "content": {
                    "application/json": {"schema": {"type": "object"}}}}, **_errors("400")}}},
        },
    }
