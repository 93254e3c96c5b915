"""Redis Cluster without a server: which keys share a slot (cache/keys.py) and the stream-read key parser the
cluster clients use (cache/client.py: stream reads and scripts)."""

from __future__ import annotations

from redis.crc import key_slot

from cache.client import command_keys
from cache.keys import Keys, alive


def slot(key: str) -> int:
    return key_slot(key.encode())


def test_a_tensor_its_waiters_lease_and_blobs_share_the_digests_slot():
    for prefix in ("trib", "tenant-a:trib"):
        k = Keys(prefix)
        for digest in ("d1", "9f" * 32):
            keys = [k.tensor("abc-image-bf16-bf16", digest), k.waiters("abc-image-bf16-bf16", digest),
                    k.lease("abc-image-bf16-bf16", digest), k.blob(digest), k.blob(digest, "features")]
            assert {slot(key) for key in keys} == {slot(digest)}


def test_a_reply_stream_and_its_lease_share_a_slot_and_gateways_spread():
    k = Keys()
    for gateway in ("0f3a9c11aa22", "gw"):
        assert slot(k.reply(gateway)) == slot(alive(k.reply(gateway)))
    assert len({slot(k.reply(f"{i:012x}")) for i in range(100)}) > 90


def test_command_keys():
    assert command_keys(("XREAD", "COUNT", 5, "BLOCK", 100, "STREAMS", "a", "b", "0", "$")) == ["a", "b"]
    assert command_keys(("XREADGROUP", "GROUP", "g", "c", "COUNT", 8, "streams", b"s", ">")) == [b"s"]
    assert command_keys(("SET", "k", b"\x89PNG\r\n\x1a\n\xff")) is None  # other commands' bytes untouched
    assert command_keys(("xread", "STREAMS")) == []
    assert command_keys(()) is None
    assert command_keys(("EVAL", "return 1", 2, "{a}x", "{a}y", "arg")) == ["{a}x", "{a}y"]
    assert command_keys((b"EVALSHA", b"abc", b"1", b"k", b"v")) == [b"k"]
    assert command_keys(("EVAL", "return 1", 0)) == []


def test_each_tier_has_one_queue_and_group():
    from cache.keys import BACKBONE_GROUP, ENCODER_GROUP

    keys = Keys("p")
    assert keys.queue("backbone") == (keys.gen(), BACKBONE_GROUP)
    assert keys.queue("encoder:image") == (keys.jobs("image"), ENCODER_GROUP)
    assert keys.queue("encoder:audio") == (keys.jobs("audio"), ENCODER_GROUP)


def test_a_tiers_budget_shares_its_live_sets_slot():
    """A worker's heartbeat writes the live set and reads the budget in one pipeline: one node."""
    for prefix in ("trib", "tenant-a:trib", "{t}"):
        k = Keys(prefix)
        for tier in ("backbone", "encoder:image", "encoder:audio"):
            assert slot(k.budget(tier)) == slot(k.live(tier)) and k.budget(tier) != k.live(tier)
