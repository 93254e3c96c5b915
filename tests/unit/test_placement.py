"""The uneven pipeline split (router/placement.py): its cost model against real weights, its optimality against
brute force, the shapes of its answers on the cases it exists for, its input errors and the ``tributary plan`` CLI."""

from __future__ import annotations

import itertools
import json
import random

import pytest

from router.placement import (
    GIB,
    Device,
    ModelCost,
    PlacementError,
    load_devices,
    parse_device_flag,
    parse_devices,
    plan,
)

# A Llama-2-70B-like text config (GQA 64/8) and a 13B-like one (MHA).
L70 = dict(model_type="llama", hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
           num_attention_heads=64, num_key_value_heads=8, vocab_size=32000, max_position_embeddings=4096)
L13 = dict(model_type="llama", hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
           num_attention_heads=40, vocab_size=32000, max_position_embeddings=4096)
A6000, A5000, A4000 = (38.7, 48), (27.8, 24), (19.2, 16)  # TFLOPS, GB


def dev(name, spec, reserve=0.0):
    return Device(name, spec[1], spec[0], reserve)


def counts(p):
    return [b - a for a, b in (s.layers for s in p.stages)]


def check_valid(p, n_layers):
    """Contiguous ranges covering every layer once, each stage within its device's memory."""
    assert p.stages[0].layers[0] == 0 and p.stages[-1].layers[1] == n_layers
    assert all(x.layers[1] == y.layers[0] for x, y in zip(p.stages, p.stages[1:]))
    assert all(s.layers[1] > s.layers[0] and s.free_bytes >= 0 for s in p.stages)


# --- the cost model -------------------------------------------------------------------------------------------------


def test_stage_bytes_match_the_shards_the_loader_reads(tiny_model):
    """Each stage's predicted weights equal the bytes backbone.loader actually loads for that range."""
    from backbone.loader import load_shard

    text = json.loads((tiny_model / "config.json").read_text())["text_config"]
    cost = ModelCost.from_text_config(text, "float32")
    n = text["num_hidden_layers"]
    for a, b in [(0, n), (0, 1), (1, n)]:
        shard, _ = load_shard(tiny_model, text, layers=range(a, b))
        tensors = [t for w in shard.layers for t in w.values()]
        tensors += [t for t in (shard.embed_weight, shard.norm_weight, shard.lm_head_weight) if t is not None]
        assert cost.stage_bytes(a, b)[0] == sum(t.numel() * t.element_size() for t in tensors), (a, b)


@pytest.mark.parametrize("family,extra", [("llama", {}), ("llama", {"attention_bias": True}), ("qwen2", {})])
def test_layer_params_match_transformers(family, extra):
    """GQA widths and the family's biases are counted as transformers builds them."""
    import transformers

    c = dict(model_type=family, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
             num_key_value_heads=2, vocab_size=100, **extra)
    cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[family]
    layer = transformers.AutoModelForCausalLM.from_config(cls(**c)).model.layers[0]
    assert ModelCost.from_text_config(c, "float32").layer_bytes == 4 * sum(p.numel() for p in layer.parameters())


def test_kv_head_and_tied_embedding_bytes():
    cost = ModelCost.from_text_config(L70, "bf16", kv_tokens=1000)
    assert cost.kv_bytes == 2 * 8 * 128 * 1000 * 2  # K and V, kv heads x head_dim, bf16
    assert cost.stage_bytes(0, 10)[1] == 10 * cost.kv_bytes
    tied = ModelCost.from_text_config(dict(L70, tie_word_embeddings=True), "bf16")
    whole, last = tied.stage_bytes(0, 80)[0], tied.stage_bytes(79, 80)[0]
    assert whole == 80 * tied.layer_bytes + tied.embed_bytes + tied.norm_bytes  # one shared copy
    assert last == tied.layer_bytes + tied.head_bytes + tied.norm_bytes  # a later last shard loads its own copy
    assert cost.stage_flops(0, 1) == cost.layer_flops and cost.stage_flops(79, 80) > cost.layer_flops


# --- the plans ------------------------------------------------------------------------------------------------------


def test_hexgen_style_split_favours_the_fast_big_device():
    """A6000 / A5000 / A4000 (HexGen's mix), 13B-like in bf16: more layers where the TFLOPS are."""
    p = plan(L13, [dev("A6000", A6000), dev("A5000", A5000), dev("A4000", A4000)], "bf16", kv_tokens=16384)
    check_valid(p, 40)
    assert counts(p) == [19, 13, 8]
    assert p.bottleneck.device.name == "A6000" and not p.skipped


def test_hexgen_70b_memory_binds_on_the_small_cards():
    """70B-like over two of each card: the A4000s hold fewer layers than their speed share, the A6000s take the rest."""
    devices = [dev(f"{n}-{i}", s, reserve=1.5) for n, s in [("A6000", A6000), ("A5000", A5000), ("A4000", A4000)]
               for i in range(2)]
    p = plan(L70, devices, "bf16", kv_tokens=32768)
    check_valid(p, 80)
    c = counts(p)
    assert c[0] >= c[2] >= c[4] and c[0] > c[4]
    speed_share = 80 * A4000[0] / sum(d.speed for d in devices)  # ~9 layers by speed alone
    assert c[4] < round(speed_share) and c[4] == 8
    assert p.stages[4].free_bytes < ModelCost.from_text_config(L70, "bf16", 32768).layer_bytes  # memory is full


@pytest.mark.parametrize("n_devices", [2, 3, 4, 5])
def test_equal_devices_split_evenly(n_devices):
    p = plan(L70, [Device(f"g{i}", 80, 100) for i in range(n_devices)], "bf16", kv_tokens=4096)
    check_valid(p, 80)
    assert max(counts(p)) - min(counts(p)) <= 1 and len(p.stages) == n_devices


def test_memory_caps_a_fast_small_device():
    """Speed alone would give the fast device 2/3 of the layers; its memory holds fewer."""
    cost = ModelCost.from_text_config(L13, "bf16")
    roomy = plan(L13, [Device("fast", 1000, 2.0), Device("slow", 1000, 1.0)], "bf16")
    assert counts(roomy)[0] >= 26
    small_gb = (cost.embed_bytes + 15.5 * cost.layer_bytes) / GIB  # room for 15 layers + embedding
    capped = plan(L13, [Device("fast", small_gb, 2.0), Device("slow", 1000, 1.0)], "bf16")
    check_valid(capped, 40)
    assert counts(capped) == [15, 25] and capped.bottleneck.device.name == "slow"


def test_a_useless_slow_device_is_skipped_unless_use_all():
    devices = [Device("fast", 80, 100.0), Device("snail", 80, 0.01)]
    p = plan(L13, devices, "bf16")
    assert counts(p) == [40] and [d.name for d in p.skipped] == ["snail"]
    forced = plan(L13, devices, "bf16", skip=False)
    assert counts(forced) == [39, 1] and forced.bottleneck.device.name == "snail"


def test_infeasible_is_a_clear_error():
    with pytest.raises(PlacementError, match=r"does not fit: 80 layers in bf16 .* GiB .* more devices"):
        plan(L70, [dev("A6000", A6000), dev("A5000", A5000), dev("A4000", A4000)], "bf16", kv_tokens=4096)
    # Enough memory in total but not in whole layers: one layer is bigger than each device.
    layer_gb = ModelCost.from_text_config(L70, "bf16").layer_bytes / GIB
    with pytest.raises(PlacementError, match="does not fit"):
        plan(L70, [Device(f"g{i}", layer_gb * 0.9, 1) for i in range(200)], "bf16")
    with pytest.raises(PlacementError, match="3 devices but only 2 layers"):
        plan(dict(L13, num_hidden_layers=2), [Device(f"g{i}", 80, 1) for i in range(3)], "bf16", skip=False)


def _brute(cost, devices, skip):
    """Every composition of the layers over the devices: (bottleneck, total time) of the best, or None."""
    n, best = cost.num_layers, None
    for c in itertools.product(range(0 if skip else 1, n + 1), repeat=len(devices)):
        if sum(c) != n:
            continue
        times, a = [], 0
        for d, k in zip(devices, c):
            if k == 0:
                continue
            if sum(cost.stage_bytes(a, a + k)) + d.reserve_gb * GIB > d.memory_gb * GIB:
                break
            times.append(cost.stage_flops(a, a + k) / (d.speed * 1e12))
            a += k
        else:
            cand = (max(times), sum(times))
            best = cand if best is None or cand < best else best
    return best


@pytest.mark.parametrize("skip", [True, False])
def test_optimal_against_brute_force(skip):
    rng = random.Random(1234 + skip)
    infeasible = 0
    for _ in range(250):
        text = dict(hidden_size=rng.choice([8, 16]), intermediate_size=rng.choice([8, 24, 64]),
                    num_hidden_layers=rng.randint(1, 7), num_attention_heads=4,
                    num_key_value_heads=rng.choice([1, 2, 4]), vocab_size=rng.choice([4, 50, 400]),
                    tie_word_embeddings=rng.random() < 0.3)
        kv = rng.choice([0, 8])
        cost = ModelCost.from_text_config(text, "float32", kv_tokens=kv)
        total = sum(cost.stage_bytes(0, cost.num_layers))
        devices = [Device(f"d{i}", rng.uniform(0.15, 0.8) * total / GIB, rng.choice([0.5, 1.0, 1.7, 3.0]))
                   for i in range(rng.randint(1, 4))]
        want = _brute(cost, devices, skip)
        if want is None:
            infeasible += 1
            with pytest.raises(PlacementError):
                plan(text, devices, "float32", kv, skip)
            continue
        p = plan(text, devices, "float32", kv, skip)
        check_valid(p, cost.num_layers)
        got = (p.bottleneck.time_s, sum(s.time_s for s in p.stages))
        assert got == pytest.approx(want, rel=1e-9), (text, devices)
    assert 10 < infeasible < 200  # both kinds of case were exercised


# --- parsing --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("data,field", [
    ([{"name": "a", "speed": 1}], r"devices\[0\]\.memory_gb: missing"),
    ([{"name": "a", "memory_gb": 8, "speed": 1}, {"name": "b", "memory_gb": 8, "speed": "fast"}],
     r"devices\[1\]\.speed: must be a number > 0, got 'fast'"),
    ([{"name": "a", "memory_gb": -1, "speed": 1}], r"devices\[0\]\.memory_gb"),
    ([{"name": "a", "memory_gb": 8, "speed": 1, "reserve_gb": -1}], r"devices\[0\]\.reserve_gb"),
    ([{"name": "a", "memory_gb": 8, "speed": 1, "reserve_gb": 8}], r"devices\[0\]\.reserve_gb: .* leaves nothing"),
    ([{"name": "", "memory_gb": 8, "speed": 1}], r"devices\[0\]\.name"),
    ([{"name": "a", "memory_gb": 8, "speed": 1, "tflops": 3}], r"devices\[0\]\.tflops: unknown field"),
    ([{"name": "a", "memory_gb": True, "speed": 1}], r"devices\[0\]\.memory_gb"),
    (["a"], r"devices\[0\]: must be an object"),
    ({"gpus": []}, r"devices: must be a non-empty list"),
])
def test_parse_errors_name_the_field(data, field):
    with pytest.raises(PlacementError, match=field):
        parse_devices(data)


def test_parse_good_inputs(tmp_path):
    want = [Device("a", 48.0, 38.7, 1.5), Device("b", 16.0, 19.2, index=1)]
    data = [{"name": "a", "memory_gb": 48, "speed": 38.7, "reserve_gb": 1.5},
            {"name": "b", "memory_gb": 16, "speed": 19.2}]
    assert parse_devices(data) == parse_devices({"devices": data}) == want
    (tmp_path / "d.json").write_text(json.dumps(data))
    assert load_devices(tmp_path / "d.json") == want
    assert [parse_device_flag("a:48:38.7:1.5"), parse_device_flag("b:16:19.2")] == [want[0], Device("b", 16.0, 19.2)]
    (tmp_path / "bad.json").write_text("[{")
    with pytest.raises(PlacementError, match="bad.json"):
        load_devices(tmp_path / "bad.json")
    with pytest.raises(PlacementError, match="speed must be a number, got 'x'"):
        parse_device_flag("a:8:x")
    with pytest.raises(PlacementError, match="expected name:memory_gb:speed"):
        parse_device_flag("a:8")
    with pytest.raises(PlacementError, match="dtype"):
        plan(L13, want, "int4")
    with pytest.raises(PlacementError, match=r"text_config\.vocab_size: missing"):
        plan({k: v for k, v in L13.items() if k != "vocab_size"}, want)


# --- the CLI --------------------------------------------------------------------------------------------------------


def test_cli_plans_the_demo_model(tiny_model, tmp_path, capsys):
    import re

    from tributary.cli import main

    n = json.loads((tiny_model / "config.json").read_text())["text_config"]["num_hidden_layers"]
    assert main(["plan", "--model", str(tiny_model), "--device", "big:1:10", "--device", "small:1:5",
                 "--use-all"]) == 0
    out = capsys.readouterr().out
    assert "bottleneck" in out and "ms/token" in out and "big" in out and "small" in out
    flags = re.findall(r"^tributary backbone --shard (\d) --num-shards 2 --layers (\d+):(\d+) --device (\S+) "
                       r"--dtype (\S+)$", out, re.MULTILINE)
    (s0, a0, b0, d0, t0), (s1, a1, b1, d1, t1) = flags
    assert (s0, s1, a0, b0, a1, b1) == ("0", "1", "0", a1, b0, str(n))
    assert (d0, d1, t0, t1) == ("cuda:0", "cuda:1", "bfloat16", "bfloat16")  # the default dtype is the GPU's
    assert int(b0) - int(a0) >= int(b1) - int(a1)  # the faster device holds at least as many layers

    # A device too small to help is skipped: the next one keeps its own cuda:N. A name that is a device stays.
    (tmp_path / "devices.json").write_text(json.dumps([{"name": "tiny", "memory_gb": 1e-6, "speed": 1},
                                                       {"name": "gpu1", "memory_gb": 1, "speed": 1},
                                                       {"name": "cuda:5", "memory_gb": 1, "speed": 1e-3}]))
    assert main(["plan", "--model", str(tiny_model), "--devices", str(tmp_path / "devices.json"),
                 "--dtype", "fp32", "--kv-tokens", "64"]) == 0
    out = capsys.readouterr().out
    assert f"{n} layers, fp32, KV for 64 tokens" in out
    assert f"tributary backbone --shard 0 --num-shards 1 --layers 0:{n} --device cuda:1 --dtype float32" in out
    assert main(["plan", "--model", str(tiny_model), "--devices", str(tmp_path / "devices.json"),
                 "--kv-tokens", "64", "--use-all"]) == 2  # tiny cannot hold a layer
    (tmp_path / "devices.json").write_text(json.dumps([{"name": "cuda:5", "memory_gb": 1, "speed": 1}]))
    assert main(["plan", "--model", str(tiny_model), "--devices", str(tmp_path / "devices.json")]) == 0
    assert "--device cuda:5 --dtype bfloat16" in capsys.readouterr().out


def test_cli_errors_are_one_line(tiny_model, capsys):
    from tributary.cli import main

    assert main(["plan", "--model", str(tiny_model), "--device", "g:0.0001:1"]) == 2
    assert "does not fit" in capsys.readouterr().err
    assert main(["plan", "--model", str(tiny_model), "--device", "g:lots:1"]) == 2
    assert "memory_gb must be a number" in capsys.readouterr().err
