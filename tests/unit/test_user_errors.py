"""Errors a client sees name the problem in its terms: which part, which format was expected, what was sent. Never a
library's message as is (an object repr, a server path, a traceback); every unsupported parameter named at once."""

from __future__ import annotations

import json

import pytest

from encoders.preprocess import MediaError
from gateway.errors import APIError, Internal, InvalidRequest, public_message
from gateway.media import MediaPart, audio_from_base64, image_from_url, undecodable
from gateway.prompt import PromptBuilder
from gateway.schemas import parse_chat_request
from tests.media import b64, data_url, png_bytes, wav_bytes

IMAGES = "PNG, JPEG, GIF, BMP or WEBP"
AUDIO = "WAV, MP3, FLAC or OGG"
PART = "messages.0.content.1"
# What the decoders say (PIL, libsndfile, binascii, json): none of it reaches a client.
LIBRARY_WORDS = ["cannot identify image file", "Error opening", "Format not recognised", "image file is truncated",
                 "Incorrect padding", "Non-base64 digit", "Invalid base64-encoded string", "codec can't decode"]

RANDOM = bytes((i * 7919 + 13) % 251 for i in range(1234))  # no known signature, not text
WAV_HEADER_GARBAGE = b"RIFF\x24\x08\x00\x00WAVE" + b"\xde\xad\xbe\xef" * 60  # a RIFF/WAVE tag, then no valid chunk
TEXT = b"Hello! This is the transcript, not the recording.\n" * 3


def no_leak(message: str) -> str:
    """No object repr, traceback or server path in ``message``."""
    assert "object at 0x" not in message and "Traceback" not in message, message
    assert "/tmp" not in message and "/work" not in message and "File \"" not in message, message
    return message


def user_facing(message: str) -> str:
    """``message`` as the client gets it, checked for what must never be in it: no leak, no decoder's words."""
    assert not any(words in no_leak(message) for words in LIBRARY_WORDS), message
    return message


@pytest.fixture(scope="module")
def builder(tiny_spec):
    return PromptBuilder(tiny_spec, tiny_spec.load_tokenizer(), max_media_bytes=1 << 20)


def build(builder, part: dict) -> InvalidRequest:
    req = parse_chat_request(json.dumps({"model": "demo-tiny", "messages": [
        {"role": "user", "content": [{"type": "text", "text": "look"}, part]}]}).encode())
    with pytest.raises(InvalidRequest) as info:
        builder.build(req)
    assert info.value.param == PART and info.value.code == "invalid_media"
    return info.value


def image_part(data: bytes) -> dict:
    return {"type": "image_url", "image_url": {"url": data_url(data)}}


def audio_part(data: bytes) -> dict:
    return {"type": "input_audio", "input_audio": {"data": b64(data), "format": "wav"}}


# The gateway's header probe: the bytes are not media of the part's kind.

def test_random_bytes_as_an_image_name_the_part_the_formats_and_what_was_sent(builder):
    msg = user_facing(build(builder, image_part(RANDOM)).message)
    assert msg.startswith(f"{PART}: the image could not be read: expected {IMAGES} data")
    assert "got 1234 bytes starting with '" in msg


def test_audio_sent_as_an_image_is_recognised(builder):
    msg = user_facing(build(builder, image_part(wav_bytes(0.1))).message)
    assert PART in msg and IMAGES in msg and "looks like WAV audio" in msg


def test_text_as_audio(builder):
    msg = user_facing(build(builder, audio_part(TEXT)).message)
    assert msg.startswith(f"{PART}: the audio could not be read: expected {AUDIO} data")
    assert f"got {len(TEXT)} bytes starting with 'Hello! T', which looks like text" in msg


def test_a_wav_header_then_garbage(builder):
    msg = user_facing(build(builder, audio_part(WAV_HEADER_GARBAGE)).message)
    assert PART in msg and AUDIO in msg and "the start of WAV audio, but the data is truncated or corrupt" in msg


def test_a_png_signature_then_garbage(builder):
    msg = user_facing(build(builder, image_part(b"\x89PNG\r\n\x1a\n garbage")).message)
    assert PART in msg and IMAGES in msg and "the start of a PNG image, but the data is truncated or corrupt" in msg
    assert "'\\x89PNG\\x0d\\x0a\\x1a\\x0a'" in msg  # the first bytes, escaped: printable whatever was sent


def test_base64_encoded_twice_is_pointed_out(builder):
    msg = user_facing(build(builder, image_part(b64(png_bytes()).encode())).message)
    assert "base64-encoded twice" in msg


def test_a_limit_keeps_its_own_words_and_names_the_part(builder, tiny_spec):
    capped = PromptBuilder(tiny_spec, tiny_spec.load_tokenizer(), max_media_bytes=1 << 20, max_audio_seconds=0.5)
    msg = user_facing(build(capped, audio_part(wav_bytes(0.6))).message)
    assert msg == f"{PART}: audio of 0.6 s is longer than 0.5 s"


# The encoder worker's decoder: the header was readable, the rest is not (the reason travels back through Redis and
# the gateway names the part).

def test_a_truncated_png_passes_the_header_probe_and_the_worker_names_it(builder, image_pre):
    data = png_bytes(64, 64, seed=1)
    truncated = data[: len(data) // 2]
    req = parse_chat_request(json.dumps({"model": "demo-tiny", "messages": [
        {"role": "user", "content": [{"type": "text", "text": "look"}, image_part(truncated)]}]}).encode())
    part = builder.build(req).media[0]  # the header is fine: the gateway queues it
    with pytest.raises(MediaError) as info:
        image_pre(truncated)
    assert str(info.value) == f"the PNG data is truncated or corrupt (got {len(truncated)} bytes)"
    assert "truncated" in info.value.detail  # the decoder's own words: for the worker's log
    err = undecodable(part, str(info.value))
    assert err.param == PART and err.code == "invalid_media" and err.status == 400
    assert user_facing(err.message) == (f"{PART}: the image could not be decoded: the PNG data is truncated or "
                                        f"corrupt (got {len(truncated)} bytes)")


@pytest.mark.parametrize("data", [RANDOM, TEXT, wav_bytes(0.1)])
def test_the_worker_refuses_a_non_image_naming_the_formats(image_pre, data):
    with pytest.raises(MediaError) as info:
        image_pre(data)
    assert user_facing(str(info.value)) == (f"it is not an image in an accepted format: expected {IMAGES} data (got "
                                            f"{len(data)} bytes)")
    assert "object at 0x" not in info.value.detail and info.value.detail.startswith("UnidentifiedImageError")


@pytest.mark.parametrize("data", [RANDOM, TEXT, WAV_HEADER_GARBAGE, png_bytes()])
def test_the_worker_refuses_a_non_audio_clip_naming_the_formats(audio_pre, data):
    with pytest.raises(MediaError) as info:
        audio_pre(data)
    assert user_facing(str(info.value)) == (f"it is not an audio clip in an accepted format: expected {AUDIO} data "
                                            f"(got {len(data)} bytes)")
    assert "object at 0x" not in info.value.detail


# Base64 and JSON: what is wrong, where, in the client's terms.

@pytest.mark.parametrize("payload,why", [
    ("abc$", "character 3 ('$') is not a base64 character"),
    ("QUJD\nREVG", "character 4 ('\\n') is not a base64 character (line breaks and spaces are not allowed)"),
    ("QUJD-_==", "URL-safe base64"),
    ("QQ==QQ==", "padding '=' appears inside the data, at character 2"),
    ("QUJDR", "its length (5 characters) does not make whole groups of 4"),
])
def test_invalid_base64_says_where(payload, why):
    with pytest.raises(InvalidRequest) as info:
        audio_from_base64(payload, PART, 1 << 20)
    assert info.value.param == PART
    assert user_facing(info.value.message).startswith(f"{PART}: the audio data is not valid base64: ")
    assert why in info.value.message
    with pytest.raises(InvalidRequest, match=f"^{PART}: the image data is not valid base64"):
        image_from_url("data:image/png;base64," + payload, PART, 1 << 20)


@pytest.mark.parametrize("raw,message", [
    (b"", "request body is empty: expected a JSON object"),
    (b'{"model": "demo",', "request body is not valid JSON: expecting property name enclosed in double quotes at "
                           "line 1, column 18"),
    (b'\xff{"model": "demo"}', "request body is not valid JSON: it is not UTF-8 text (byte 0 cannot be decoded)"),
    (b'{"model": "demo", "temperature": NaN}', "request body is not valid JSON: NaN is not a JSON value"),
    (b'{"model": "de\tmo"}', "request body is not valid JSON: invalid control character at line 1, column 14"),
    # Two readers (a proxy, this server) could take different values: refused, not the last one silently
    (b'{"model": "nope", "model": "demo-tiny", "messages": []}', "request body is not valid JSON for this server: the "
                                                                 "key 'model' appears twice in one object"),
    (b'{"messages": [{"role": "user", "content": "a", "content": "b"}]}', "request body is not valid JSON for this "
                                                                          "server: the key 'content' appears twice"),
])
def test_invalid_json_in_the_clients_terms(raw, message):
    with pytest.raises(InvalidRequest) as info:
        parse_chat_request(raw)
    assert user_facing(info.value.message).startswith(message)


def test_a_missing_field_is_named_as_missing():
    with pytest.raises(InvalidRequest) as info:
        parse_chat_request(b'{"model": "demo", "messages": [{"content": "hi"}]}')
    assert info.value.param == "messages.0.role"
    assert info.value.message == "missing required parameter 'messages.0.role'"


# Unsupported and unknown parameters: all of them in one 400.

def chat(**extra) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as info:
        parse_chat_request(json.dumps({"model": "demo", "messages": [{"role": "user", "content": "hi"}],
                                       **extra}).encode())
    assert info.value.status == 400
    return info.value


def test_three_unsupported_parameters_are_named_at_once():
    err = chat(n=2, logprobs=True, tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}])
    assert err.code == "unsupported_parameter" and err.param == "n"
    assert err.message == ("parameters not supported by this server: 'n' (only 1), 'logprobs' (only false), "
                           "'tools' (only [])")


def test_unsupported_and_unknown_parameters_together_in_the_bodys_order():
    err = chat(best_of=3, service_tier="flex", echo=True, audio={"voice": "alloy"})
    assert err.code == "unsupported_parameter" and err.param == "best_of"
    assert err.message == ("parameters not supported by this server: 'service_tier' (only \"auto\" or \"default\"), "
                           "'audio'; unknown parameters: 'best_of', 'echo'")


def test_unknown_parameters_anywhere_are_all_named():
    err = chat(messages=[{"role": "user", "content": [{"type": "text", "text": "a", "bold": True}]}], frobnicate=1)
    assert err.param == "messages.0.content.0.bold" and err.code is None
    assert err.message == "unknown parameters: 'messages.0.content.0.bold', 'frobnicate'"


def test_one_unsupported_parameter_says_what_it_accepts():
    err = chat(presence_penalty=0.5)
    assert err.param == "presence_penalty" and err.code == "unsupported_parameter"
    assert err.message == "parameter 'presence_penalty' is not supported by this server (it accepts only 0)"


def test_unsupported_parameters_come_before_other_mistakes():
    err = chat(temperature=9, n=2, logprobs=True)
    assert err.param == "n" and "'n'" in err.message and "'logprobs'" in err.message


# The last line of defence: no error body carries an object repr or a traceback, whoever built the message.

@pytest.mark.parametrize("message,clean", [
    ("cannot identify image file <_io.BytesIO object at 0x7fb9c1d2e3f0>", "cannot identify image file"),
    ("Error opening <_io.BytesIO object at 0x7FC4AB12>: Format not recognised.", "Error opening: Format not "
                                                                                  "recognised."),
    ("callback <function <lambda> at 0x7f00aa> failed", "callback failed"),
    ("decode failed\nTraceback (most recent call last):\n  File \"/work/x.py\", line 3, in f\nValueError: x",
     "decode failed"),
    ("image of 10x10 pixels exceeds 4 pixels", "image of 10x10 pixels exceeds 4 pixels"),  # 0x... in words: kept
])
def test_error_bodies_never_carry_reprs_or_tracebacks(message, clean):
    assert public_message(message) == clean
    for cls in (InvalidRequest, Internal, APIError):
        err = cls(message, param=PART)
        assert err.message == clean and str(err) == clean
        body = json.loads(err.response().body)
        assert body["error"]["message"] == clean and body["error"]["param"] == PART
        no_leak(body["error"]["message"])


def test_a_message_that_was_only_a_repr_still_says_something():
    assert public_message("<_io.BytesIO object at 0x7f00>") == "the request failed (the details are in the server log)"


def test_undecodable_scrubs_a_worker_reason_from_an_older_worker():
    part = MediaPart("audio", b"x", PART)
    err = undecodable(part, "cannot decode audio: Error opening <_io.BytesIO object at 0x7fc4>: Format not recognised.")
    assert "object at 0x" not in err.message and err.message.startswith(f"{PART}: the audio could not be decoded: ")


@pytest.mark.parametrize("field,value", [("max_tokens", "4"), ("max_tokens", True), ("seed", "1"), ("stream", 1),
                                         ("temperature", "0.5"), ("max_completion_tokens", 4.5)])
def test_values_of_the_wrong_json_type_are_refused_not_coerced(field, value):
    """As OpenAI's API: a string is not a number, a number is not a boolean."""
    from gateway.schemas import parse_chat_request

    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], field: value}
    with pytest.raises(InvalidRequest) as info:
        parse_chat_request(json.dumps(body).encode())
    assert info.value.param == field


@pytest.mark.parametrize("limit,budget,param", [
    ("prompt", {}, "messages"), ("budget", {"max_tokens": 900}, "max_tokens"),
    ("budget", {"max_completion_tokens": 900}, "max_completion_tokens"), (None, {"max_tokens": 900}, None)])
def test_a_kv_pool_refusal_is_a_context_length_error_naming_the_field(limit, budget, param):
    """A backbone whose KV pool holds less than the request refuses it (BAD_PLAN, ``limit`` says what is too long):
    the client gets the same code as for the model's context, naming its own field; an event from an older backbone
    (no ``limit``) stays a 400 with no code."""
    from gateway.chat import _event_error
    from router import messages as m

    req = parse_chat_request(json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], **budget}))
    ev = m.TokenEvent(request_id="r", token_ids=[], prompt_tokens=700, completion_tokens=0,
                      finish=m.FinishReason.ERROR, code=m.ErrorCode.BAD_PLAN, error="the pool has 40 blocks",
                      limit=limit)
    exc = _event_error(ev, req)
    assert isinstance(exc, InvalidRequest) and exc.message == "the pool has 40 blocks"
    assert (exc.code, exc.param) == (("context_length_exceeded", param) if limit else (None, None))


def test_audio_at_a_rate_the_model_cannot_resample_to_is_a_400_before_any_encoding(builder):
    part = {"type": "input_audio", "input_audio": {"data": b64(wav_bytes(0.01, rate=191_999)), "format": "wav"}}
    err = build(builder, part)
    assert err.status == 400 and "191999 Hz cannot be resampled" in err.message
    assert err.param == "messages.0.content.1"
