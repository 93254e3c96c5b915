"""router/messages.py: every wire message round-trips; versions, unions and garbage are handled strictly."""

from __future__ import annotations

import msgspec
import pytest

from router import messages as m

SAMPLING = m.SamplingParams(max_tokens=17, temperature=0.3, top_p=0.9, seed=1234, stop_token_ids=[5, 9],
                            ignore_eos=True)

MESSAGES = [
    m.EncodeJob(request_id="r1", job_id="j1", modality=m.Modality.IMAGE, encoder_id="abc-image", digest="d" * 64,
                blob_key="trib:blob:d", reply_to="trib:reply:g1", deadline=1_700_000_000.25),
    m.EncodeJob(request_id="r1", job_id="j2", modality=m.Modality.AUDIO, encoder_id="abc-audio", digest="e" * 64,
                blob_key="trib:blob:e", reply_to="trib:reply:g1", deadline=0.0),
    m.EncodeDone(request_id="r1", job_id="j1", tensor_key="trib:t:abc-image:d", num_tokens=16),
    m.EncodeFailed(request_id="r1", job_id="j2", tensor_key="trib:t:e:d", code=m.ErrorCode.BAD_MEDIA,
                   error="cannot decode audio"),
    m.MediaRef(modality=m.Modality.AUDIO, tensor_key="trib:t:abc-audio:e", num_tokens=25),
    SAMPLING,
    m.SamplingParams(max_tokens=1),
    m.PromptPlan(request_id="r2", reply_to="trib:reply:g1", token_ids=[1, 3, 3, 3, 4, 7],
                 media=[m.MediaRef(modality=m.Modality.IMAGE, tensor_key="k1", num_tokens=3),
                        m.MediaRef(modality=m.Modality.AUDIO, tensor_key="k2", num_tokens=1)],
                 sampling=SAMPLING, deadline=12.5),
    m.PromptPlan(request_id="r3", reply_to="x", token_ids=[], sampling=m.SamplingParams(max_tokens=3),
                 deadline=1.0),
    m.TokenEvent(request_id="r2", token_ids=[10, 11], prompt_tokens=6, completion_tokens=2),
    m.TokenEvent(request_id="r2", token_ids=[], prompt_tokens=6, completion_tokens=9,
                 finish=m.FinishReason.LENGTH),
    m.TokenEvent(request_id="r2", token_ids=[], prompt_tokens=6, completion_tokens=0,
                 finish=m.FinishReason.ERROR, code=m.ErrorCode.BAD_PLAN, error="3 placeholders, 2 rows"),
]


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda x: type(x).__name__)
def test_round_trip(msg):
    data = m.encode(msg)
    assert isinstance(data, bytes)
    out = m.decode(data, type(msg))
    assert type(out) is type(msg)
    assert out == msg
    assert out.v == m.WIRE_VERSION


def test_enums_come_back_as_enums():
    out = m.decode(m.encode(MESSAGES[3]), m.EncodeFailed)
    assert out.code is m.ErrorCode.BAD_MEDIA
    plan = m.decode(m.encode(MESSAGES[7]), m.PromptPlan)
    assert [r.modality for r in plan.media] == [m.Modality.IMAGE, m.Modality.AUDIO]
    assert plan.sampling.stop_token_ids == [5, 9] and plan.sampling.seed == 1234


@pytest.mark.parametrize("msg", [x for x in MESSAGES if isinstance(x, (m.EncodeDone, m.EncodeFailed, m.TokenEvent))],
                         ids=lambda x: type(x).__name__)
def test_reply_union_decodes_to_the_right_type(msg):
    out = m.decode(m.encode(msg), m.ReplyMessage)
    assert type(out) is type(msg)
    assert out == msg


@pytest.mark.parametrize("msg", [MESSAGES[0], MESSAGES[7], SAMPLING], ids=lambda x: type(x).__name__)
def test_reply_union_refuses_non_reply_messages(msg):
    with pytest.raises(m.WireError):
        m.decode(m.encode(msg), m.ReplyMessage)


def test_decoding_as_the_wrong_type_is_refused():
    done = m.encode(MESSAGES[2])
    with pytest.raises(m.WireError):
        m.decode(done, m.EncodeJob)
    with pytest.raises(m.WireError):
        m.decode(done, m.TokenEvent)


@pytest.mark.parametrize("version", [0, 1, m.WIRE_VERSION + 1, m.WIRE_VERSION + 7])
def test_other_wire_versions_refused(version):
    msg = m.EncodeDone(v=version, request_id="r", job_id="j", tensor_key="k", num_tokens=1)
    data = m.encode(msg)
    with pytest.raises(m.WireError, match="version"):
        m.decode(data, m.EncodeDone)
    with pytest.raises(m.WireError, match="version"):
        m.decode(data, m.ReplyMessage)


@pytest.mark.parametrize("data", [
    b"",
    b"garbage",
    b"\xc1",  # never valid msgpack
    msgspec.msgpack.encode(42),
    msgspec.msgpack.encode({"request_id": "r"}),  # no type tag
    msgspec.msgpack.encode({"type": "Nope", "request_id": "r"}),
    msgspec.json.encode(MESSAGES[2]),  # JSON is not the wire format
])
def test_garbage_refused(data):
    with pytest.raises(m.WireError):
        m.decode(data, m.ReplyMessage)
    with pytest.raises(m.WireError):
        m.decode(data, m.EncodeDone)


def test_missing_field_refused():
    raw = msgspec.msgpack.decode(m.encode(MESSAGES[2]))
    del raw["num_tokens"]
    with pytest.raises(m.WireError, match="num_tokens"):
        m.decode(msgspec.msgpack.encode(raw), m.EncodeDone)


def test_wrong_field_type_refused():
    raw = msgspec.msgpack.decode(m.encode(MESSAGES[9]))
    raw["token_ids"] = ["a"]
    with pytest.raises(m.WireError):
        m.decode(msgspec.msgpack.encode(raw), m.TokenEvent)


def test_unknown_enum_value_refused():
    raw = msgspec.msgpack.decode(m.encode(MESSAGES[0]))
    raw["modality"] = "video"
    with pytest.raises(m.WireError):
        m.decode(msgspec.msgpack.encode(raw), m.EncodeJob)


def test_messages_are_frozen():
    with pytest.raises(AttributeError):
        MESSAGES[2].num_tokens = 3
