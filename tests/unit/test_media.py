"""gateway/media.py: data URL / base64 unwrapping with size caps, and content-addressed digests."""

from __future__ import annotations

import base64

import pytest

from gateway.errors import InvalidRequest, PayloadTooLarge
from gateway.media import audio_from_base64, content_digest, image_from_url
from tests.media import b64, data_url, png_bytes, wav_bytes

LIMIT = 1 << 20


def test_png_data_url_decodes_to_the_exact_bytes():
    png = png_bytes()
    assert image_from_url(data_url(png), "messages.0.content.1", LIMIT) == png


@pytest.mark.parametrize("mime", ["image/jpeg", "image/webp", "image/x-anything", ""])
def test_any_image_mime_or_none_accepted(mime):
    data = b"\x01\x02\x03\x04\x05"
    assert image_from_url(f"data:{mime};base64," + b64(data), "p", LIMIT) == data


@pytest.mark.parametrize("prefix", ["DATA:image/png;base64,", "Data:Image/PNG;Base64,", "data:IMAGE/jpeg;BASE64,"])
def test_data_url_scheme_type_and_encoding_are_case_insensitive(prefix):
    png = png_bytes()
    assert image_from_url(prefix + b64(png), "p", LIMIT) == png


@pytest.mark.parametrize("url", ["http://example.com/cat.png", "https://example.com/cat.png",
                                 "HTTPS://example.com/cat.png"])
def test_remote_url_refused(url):
    with pytest.raises(InvalidRequest) as info:
        image_from_url(url, "messages.0.content.2", LIMIT)
    assert info.value.code == "remote_url_disabled"
    assert info.value.param == "messages.0.content.2"
    assert info.value.status == 400


@pytest.mark.parametrize("url", ["ftp://example.com/x.png", "file:///etc/passwd", "cat.png", "", "DATA:image/png"])
def test_non_data_url_refused(url):
    with pytest.raises(InvalidRequest) as info:
        image_from_url(url, "p", LIMIT)
    assert info.value.param == "p"
    assert info.value.code != "remote_url_disabled"


@pytest.mark.parametrize("url", [
    "data:image/png," + "abc",  # not base64-encoded
    "data:image/png;charset=utf-8,abc",
    "data:image/png;base64",  # no comma
])
def test_non_base64_data_url_refused(url):
    with pytest.raises(InvalidRequest, match="base64") as info:
        image_from_url(url, "p", LIMIT)
    assert info.value.param == "p"


@pytest.mark.parametrize("payload", ["!!!!", "AAA", "AA=A", "QUJD\nREVG", "QUJD REVG"])
def test_invalid_base64_payload_refused(payload):
    with pytest.raises(InvalidRequest, match="base64"):
        image_from_url("data:image/png;base64," + payload, "p", LIMIT)
    with pytest.raises(InvalidRequest, match="base64"):
        audio_from_base64(payload, "p", LIMIT)


@pytest.mark.parametrize("mime", ["text/plain", "audio/wav", "application/octet-stream", "video/mp4"])
def test_non_image_mime_refused(mime):
    with pytest.raises(InvalidRequest) as info:
        image_from_url(data_url(png_bytes(), mime), "messages.0.content.0", LIMIT)
    assert mime in info.value.message
    assert info.value.param == "messages.0.content.0"


def test_image_over_the_cap_refused_with_413():
    with pytest.raises(PayloadTooLarge) as info:
        image_from_url(data_url(b"\x00" * (LIMIT + 1)), "messages.0.content.0", LIMIT)
    assert info.value.status == 413 and info.value.code == "media_too_large"  # a code, as every 4xx has
    assert info.value.param == "messages.0.content.0"


def test_audio_over_the_cap_refused_with_413():
    with pytest.raises(PayloadTooLarge):
        audio_from_base64(b64(b"\x00" * (LIMIT + 1)), "p", LIMIT)


@pytest.mark.parametrize("size", [LIMIT - 2, LIMIT - 1, LIMIT])
def test_media_at_or_under_the_cap_accepted(size):
    # Base64 padding must not count toward the size: exactly `limit` bytes is not "larger than limit bytes".
    data = bytes(range(256)) * (size // 256) + b"\x07" * (size % 256)
    assert len(data) == size
    assert image_from_url(data_url(data), "p", LIMIT) == data
    assert audio_from_base64(b64(data), "p", LIMIT) == data


@pytest.mark.parametrize("size", [1, 2, 3, 4, 5, 6, 7])
def test_small_cap_boundary(size):
    data = b"x" * size
    assert audio_from_base64(b64(data), "p", size) == data
    with pytest.raises(PayloadTooLarge):
        audio_from_base64(b64(data + b"y"), "p", size)


def test_audio_base64_decodes_to_the_exact_bytes():
    wav = wav_bytes(0.1)
    assert audio_from_base64(base64.b64encode(wav).decode(), "p", LIMIT) == wav


PRE = {"image_size": 32, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25]}


def test_digest_equal_for_equal_inputs():
    a = content_digest("fp-image", dict(PRE), b"bytes")
    b = content_digest("fp-image", dict(PRE), b"bytes")
    assert a == b
    assert len(a) == 64 and int(a, 16) >= 0  # a sha256 hex digest


def test_digest_ignores_config_key_order():
    reordered = {k: PRE[k] for k in reversed(list(PRE))}
    assert content_digest("e", PRE, b"x") == content_digest("e", reordered, b"x")


def test_digest_differs_with_encoder_id():
    assert content_digest("fp1-image", PRE, b"x") != content_digest("fp2-image", PRE, b"x")
    assert content_digest("fp1-image", PRE, b"x") != content_digest("fp1-audio", PRE, b"x")


def test_digest_differs_with_preprocess_config():
    other = dict(PRE, image_size=64)
    assert content_digest("e", PRE, b"x") != content_digest("e", other, b"x")
    assert content_digest("e", PRE, b"x") != content_digest("e", {}, b"x")


def test_digest_differs_with_bytes():
    png = png_bytes(seed=0)
    assert content_digest("e", PRE, png) != content_digest("e", PRE, png_bytes(seed=1))
    assert content_digest("e", PRE, png) != content_digest("e", PRE, png + b"\x00")
    assert content_digest("e", PRE, b"") != content_digest("e", PRE, b"\x00")


def test_digest_fields_are_delimited():
    # Moving characters from one field to the next must not give the same key.
    assert content_digest("ab", {}, b"c") != content_digest("a", {}, b"bc")
    assert content_digest("e", {"a": 1}, b"") != content_digest("e", {}, b'{"a": 1}')


def test_base64_decoded_a_megabyte_at_a_time_is_what_one_call_gives():
    """Large media are decoded in chunks (binascii holds the GIL for a whole call: 16 MB held the event loop 0.1 s);
    the result, and what is refused, are one call's."""
    import base64
    import binascii
    import os

    from gateway.media import B64_CHUNK, b64decode_chunked

    for n in (3 * B64_CHUNK // 4, 3 * B64_CHUNK // 4 + 1, 5 * B64_CHUNK // 2 + 2, 7 * B64_CHUNK // 3):
        raw = os.urandom(n)
        assert b64decode_chunked(base64.b64encode(raw).decode()) == raw
    good = base64.b64encode(os.urandom(3 * B64_CHUNK // 4)).decode()  # exactly one chunk, no padding
    for bad in (good[:-4] + "QQ==" + good,  # padding where a chunk ends, data after it
                good + good[:-1],  # not whole groups of 4
                good + "*" * 4 + good):  # not the alphabet, in the second chunk
        with pytest.raises((binascii.Error, ValueError)):
            base64.b64decode(bad, validate=True)
        with pytest.raises((binascii.Error, ValueError)):
            b64decode_chunked(bad)


def test_a_cached_count_of_zero_rows_is_a_count_not_damage():
    """An audio clip too short for one token (20 ms for Qwen2-Audio, as its processor counts) is encoded into 0
    rows: its entry was taken for damaged and encoded again at every send (an outside tester's)."""
    from types import SimpleNamespace

    from gateway.encoding import MediaEncoder

    enc = MediaEncoder.__new__(MediaEncoder)
    enc.spec = SimpleNamespace(max_context=100)
    assert enc._count_of("k", b"0", "r") == 0 and enc._count_of("k", b"100", "r") == 100
    assert enc._count_of("k", b"-1", "r") is None and enc._count_of("k", b"101", "r") is None
    assert enc._count_of("k", b"abc", "r") is None and enc._count_of("k", None, "r") is None


def test_an_encoding_cut_with_its_request_leaves_no_exception_unretrieved():
    """A Realtime response with media cancelled as its encoding heard the client was gone: wait_for (Python 3.11)
    cancelled the encoding, which ended with ClientGone rather than cancelled, and nothing took it: "Task exception
    was never retrieved" at error level (an outside tester's)."""
    import asyncio
    import gc

    from gateway.config import GatewayConfig
    from gateway.encoding import MediaEncoder
    from gateway.tiers import ClientGone

    enc = MediaEncoder.__new__(MediaEncoder)
    enc.cfg = GatewayConfig(model_dir="m", redis_url="redis://x")

    async def encode(*args):  # hears the client gone as the cancel comes: the cancel is lost, ClientGone raised
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            raise ClientGone() from None

    enc._encode = encode
    unretrieved = []

    async def go():
        asyncio.get_running_loop().set_exception_handler(lambda loop, context: unretrieved.append(context))
        request = asyncio.ensure_future(enc.encode("r", ["a part"], asyncio.Queue()))
        await asyncio.sleep(0)
        request.cancel()
        with pytest.raises(asyncio.CancelledError):
            await request
        del request
        for _ in range(3):
            gc.collect()
            await asyncio.sleep(0)

    asyncio.run(go())
    assert not unretrieved, [c["message"] for c in unretrieved]
