"""gateway/config.py: the per-prompt media limits take vLLM's syntax; bad values name what is wrong."""

from __future__ import annotations

import pytest

from gateway.config import DEFAULT_MM_LIMITS, GatewayConfig, parse_mm_limits


def test_limits_take_vllms_json_and_fill_the_defaults():
    assert parse_mm_limits('{"image": 4, "audio": 1}') == {"image": 4, "audio": 1}
    assert parse_mm_limits('{"audio": 0}') == {**DEFAULT_MM_LIMITS, "audio": 0}
    assert GatewayConfig("m", "redis://x", limit_mm_per_prompt='{"image": 2}').limit_mm_per_prompt["image"] == 2
    assert GatewayConfig("m", "redis://x").limit_mm_per_prompt == DEFAULT_MM_LIMITS


@pytest.mark.parametrize("value,match", [
    ("{image: 4}", "JSON object"), ("[4]", "JSON object"), ('{"video": 1}', "unknown modality"),
    ('{"image": -1}', "integer >= 0"), ('{"image": 1.5}', "integer >= 0"), ('{"image": true}', "integer >= 0"),
])
def test_bad_limits_name_the_problem(value, match):
    with pytest.raises(ValueError, match=match):
        parse_mm_limits(value)
