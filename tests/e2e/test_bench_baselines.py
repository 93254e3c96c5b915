"""The monolithic baseline bench/serve.py compares Tributary with (bench/monolith.py) serves the same model through
the same API: the same prompt for the same request (media rows included), streamed, and the same refusals."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
from openai import OpenAI

from cache.embedded import free_port
from tests.media import b64, data_url, png_bytes, wav_bytes

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def monolith(tiny_model, tmp_path_factory):
    port = free_port()
    log = (tmp_path_factory.mktemp("monolith") / "monolith.log").open("w")
    proc = subprocess.Popen([sys.executable, str(ROOT / "bench" / "monolith.py"), "--model", str(tiny_model),
                             "--port", str(port), "--max-batch", "4", "--max-wait-ms", "20"],
                            stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert proc.poll() is None and time.monotonic() < deadline, Path(log.name).read_text()[-3000:]
        time.sleep(0.3)  # importing torch, loading the checkpoint
    yield base
    proc.terminate()
    proc.wait(30)
    log.close()


def messages(seed: int) -> list[dict]:
    return [{"role": "user", "content": [
        {"type": "text", "text": "What do you see and hear?"},
        {"type": "image_url", "image_url": {"url": data_url(png_bytes(48, 36, seed=seed))}},
        {"type": "input_audio", "input_audio": {"data": b64(wav_bytes(1.0, seed=seed)), "format": "wav"}}]}]


def test_the_same_prompt_through_the_same_api(monolith, cluster):
    clients = {name: OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
               for name, url in (("monolith", monolith), ("tributary", cluster.base_url))}
    usage = {}
    for name, client in clients.items():
        assert [m.id for m in client.models.list().data] == [cluster.model]
        r = client.chat.completions.create(model=cluster.model, messages=messages(3), max_tokens=5, temperature=0,
                                           extra_body={"ignore_eos": True})
        assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 5
        usage[name] = r.usage.prompt_tokens
        chunks = list(client.chat.completions.create(model=cluster.model, messages=messages(3), max_tokens=5,
                                                     temperature=0, stream=True, stream_options={"include_usage": True},
                                                     extra_body={"ignore_eos": True}))
        assert chunks[-1].usage.completion_tokens == 5
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model=cluster.model, messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}], max_tokens=2)
    assert usage["monolith"] == usage["tributary"], usage


def test_requests_batched_together_each_get_their_own_tokens(monolith, cluster):
    from concurrent.futures import ThreadPoolExecutor

    client = OpenAI(base_url=f"{monolith}/v1", api_key="unused", max_retries=0, timeout=120)

    def ask(n: int) -> int:
        r = client.chat.completions.create(model=cluster.model, messages=messages(n), max_tokens=2 + n,
                                           temperature=0, extra_body={"ignore_eos": True})
        return r.usage.completion_tokens

    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(ask, range(4))) == [2, 3, 4, 5]  # one static batch, each request its own length
