"""gateway/detokenize.py: incremental text equals a whole decode; stop strings are cut and never half sent."""

from __future__ import annotations

import random

import pytest

from gateway.detokenize import Detokenizer

SENTENCE = "The river flows into sea under bright sky while small birds sing near old stone bridge."
UNICODE = "héllo wörld 日本"


@pytest.fixture(scope="module")
def tok(tiny_spec):
    return tiny_spec.load_tokenizer()


def encode(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def stream(detok, ids, chunk=1):
    """Feed ids `chunk` at a time; returns every delta, the flush last."""
    deltas = [detok.add(ids[i : i + chunk]) for i in range(0, len(ids), chunk)]
    return deltas + [detok.flush()]


def test_plain_text_one_token_at_a_time(tok):
    ids = encode(tok, SENTENCE)
    assert len(ids) > 10
    deltas = stream(Detokenizer(tok), ids)
    assert "".join(deltas) == SENTENCE
    assert sum(1 for d in deltas[:-1] if d) > len(ids) // 2  # released as it goes, not all at the end


def test_multibyte_utf8_text(tok):
    ids = encode(tok, UNICODE)
    assert tok.decode(ids) == UNICODE
    # Some tokens of this text are partial UTF-8 characters on their own.
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    deltas = stream(Detokenizer(tok), ids)
    assert "".join(deltas) == UNICODE
    assert not any("\ufffd" in d for d in deltas)  # a half character is never released
    assert deltas[0] == "h"  # and whole ones are released right away


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 1000])
def test_chunked_feeding_gives_the_same_text(tok, chunk):
    text = SENTENCE + " " + UNICODE + " ünïcödé ∑ 🎉 done"
    ids = encode(tok, text)
    assert "".join(stream(Detokenizer(tok), ids, chunk)) == text


@pytest.mark.parametrize("seed", range(40))
def test_random_ids_equal_a_whole_decode(tok, seed):
    rng = random.Random(seed)
    ids = [rng.randrange(len(tok)) for _ in range(rng.randint(1, 60))]
    chunk = rng.choice([1, 1, 2, 5])
    out = "".join(stream(Detokenizer(tok), ids, chunk))
    assert out == tok.decode(ids, skip_special_tokens=True)


def test_ids_ending_inside_a_character_are_flushed(tok):
    ids = encode(tok, "ok 日本")
    cut = next(k for k in range(len(ids), 0, -1) if tok.decode(ids[:k]).endswith("\ufffd"))
    head = ids[:cut]
    detok = Detokenizer(tok)
    sent = detok.add(head)
    assert "\ufffd" not in sent  # held while it may still complete...
    assert sent + detok.flush() == tok.decode(head)  # ...and sent as decoded when generation ends there


def test_special_tokens_are_skipped(tok, tiny_spec):
    eos = tiny_spec.eos_token_ids[0]
    ids = encode(tok, "hello") + [eos] + encode(tok, " world") + [tiny_spec.placeholder_ids["image"]]
    out = "".join(stream(Detokenizer(tok), ids))
    assert out == "hello world" == tok.decode(ids, skip_special_tokens=True)


def test_flush_twice_and_empty_input(tok):
    detok = Detokenizer(tok)
    assert detok.add([]) == ""
    assert detok.flush() == ""
    assert detok.add(encode(tok, "abc")) == "abc"  # no stop strings: nothing is held back
    assert detok.flush() == ""
    assert detok.text == "abc"
    assert detok.flush() == ""


def test_stop_string_cuts_the_text(tok):
    ids = encode(tok, SENTENCE)
    detok = Detokenizer(tok, stop=["bright"])
    deltas = stream(detok, ids)
    assert "".join(deltas) == SENTENCE[: SENTENCE.index("bright")]
    assert detok.stopped
    assert "bright" not in "".join(deltas)


def test_nothing_after_a_stop(tok):
    detok = Detokenizer(tok, stop=["river"])
    out = detok.add(encode(tok, SENTENCE))
    assert detok.stopped and out == "The "
    assert detok.add(encode(tok, " more text")) == ""
    assert detok.flush() == ""
    assert detok.text == "The "


def test_earliest_of_several_stop_strings_wins(tok):
    detok = Detokenizer(tok, stop=["stone", "birds", "zzz"])
    out = "".join(stream(detok, encode(tok, SENTENCE)))
    assert out == SENTENCE[: SENTENCE.index("birds")]


def test_stop_string_absent_releases_everything(tok):
    ids = encode(tok, SENTENCE)
    detok = Detokenizer(tok, stop=["xyzzy"])
    deltas = [detok.add([i]) for i in ids]
    assert not detok.stopped
    held = SENTENCE[len("".join(deltas)) :]
    assert len(held) <= len("xyzzy") - 1  # only a possible stop prefix is held back
    assert detok.flush() == held
    assert "".join(deltas) + held == SENTENCE


def test_stop_string_at_the_start(tok):
    detok = Detokenizer(tok, stop=["The"])
    assert "".join(stream(detok, encode(tok, SENTENCE))) == ""
    assert detok.stopped


def test_multibyte_stop_string(tok):
    detok = Detokenizer(tok, stop=["日"])
    out = "".join(stream(detok, encode(tok, UNICODE)))
    assert out == "héllo wörld "
    assert detok.stopped


def _check_never_partially_sent(tok, text, stop, chunk=1):
    ids = encode(tok, text)
    detok = Detokenizer(tok, stop=[stop])
    sent = ""
    final = text[: text.index(stop)]
    for i in range(0, len(ids), chunk):
        sent += detok.add(ids[i : i + chunk])
        # At every moment what was sent is a prefix of the final answer: no part of the stop string leaked.
        assert final.startswith(sent), (stop, sent)
        if detok.stopped:
            break
    sent += detok.flush()
    assert detok.stopped
    assert sent == final


def test_stop_string_split_across_tokens(tok):
    ids = encode(tok, SENTENCE)
    pieces = [tok.decode([i]) for i in ids]
    # "r flo" spans at least two tokens ("river" / " flows"): check it really is split.
    start = SENTENCE.index("r flo")
    bounds, pos = [], 0
    for p in pieces:
        pos += len(p)
        bounds.append(pos)
    assert any(start < b < start + len("r flo") for b in bounds)
    _check_never_partially_sent(tok, SENTENCE, "r flo")


@pytest.mark.parametrize("seed", range(25))
def test_random_stop_strings_never_leak(tok, seed):
    rng = random.Random(seed)
    text = SENTENCE + " " + UNICODE
    n = rng.randint(1, 8)
    start = rng.randrange(1, len(text) - n)
    stop = text[start : start + n]
    _check_never_partially_sent(tok, text, stop, chunk=rng.choice([1, 2, 4]))
