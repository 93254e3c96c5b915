"""Realtime: time from an audio turn's end to the first text delta, ``/v1/realtime`` against REST, in one run.

    .venv/bin/python bench/realtime.py [--seconds 2,10,30] [--trials 3]   # ~2 min on 2 cores

One local cluster (``tributary up`` on the ``small`` demo model, embedded Redis). For each clip length, ``--trials``
fresh clips (random PCM16 at 24 kHz, so no cache hit), alternating:

* realtime: the clip is appended in 100 ms chunks (as a microphone streams it); once the server has handled them,
  ``input_audio_buffer.commit`` and ``response.create`` are sent; timed from the commit to the first
  ``response.output_text.delta``;
* REST: the same length of audio as a 24 kHz WAV in a streamed chat completion; timed from sending the request to
  its first content chunk (the upload is part of it: a REST client has nothing to send ahead).

Prints the medians and realtime / REST. The realtime path computes the audio's features while it is appended, so at
commit only the last frames, the encoder's forward pass and the first token are left; REST uploads the WAV, and the
encoder decodes, resamples and computes the features before its forward pass.
"""

from __future__ import annotations

import argparse
import base64
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gateway.realtime import pcm16_to_wav  # noqa: E402
from tests.media import pcm16  # noqa: E402


def realtime_turn(client, model: str, pcm: bytes) -> float:
    with client.realtime.connect(model=model) as conn:
        conn.recv()  # session.created
        conn.session.update(session={"type": "realtime", "temperature": 0.0})
        conn.recv()
        for i in range(0, len(pcm), 4800):
            conn.input_audio_buffer.append(audio=base64.b64encode(pcm[i : i + 4800]).decode())
        # A microphone sends the clip over its own length, so the server has handled every append by the time the
        # user stops; this sends them at once, then waits for an answer to a later event (events are handled in
        # order) before the clock starts.
        conn.session.update(session={"type": "realtime"})
        while conn.recv().type != "session.updated":
            pass
        t0 = time.perf_counter()
        conn.input_audio_buffer.commit()
        conn.response.create(response={"max_output_tokens": 2})
        for event in conn:
            if event.type == "error":
                raise RuntimeError(f"realtime error: {event}")
            if event.type == "response.output_text.delta" and event.delta:
                return time.perf_counter() - t0
            if event.type == "response.done":
                raise RuntimeError("the response gave no text")
    raise RuntimeError("the socket closed")


def rest_turn(client, model: str, pcm: bytes) -> float:
    t0 = time.perf_counter()
    stream = client.chat.completions.create(model=model, temperature=0.0, max_tokens=2, stream=True, messages=[
        {"role": "user", "content": [{"type": "input_audio", "input_audio": {
            "data": base64.b64encode(pcm16_to_wav(pcm)).decode(), "format": "wav"}}]}])
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            took = time.perf_counter() - t0
            stream.close()
            return took
    raise RuntimeError("the stream gave no text")


def preprocess_costs(model_dir: Path, lengths: list[float], trials: int = 5) -> dict[str, tuple[float, float]]:
    """What streaming saves the encoder, per clip: its preprocessing of the 24 kHz WAV (decode, resample, features)
    against loading streamed features; medians in seconds, on this model's window and on Whisper's 30 s one."""
    from encoders.preprocess import AudioPreprocessor
    from models.audio import AudioConfig, StreamingFeatures, pcm16_samples
    from models.spec import ModelSpec
    from models.trimodal import audio_output_length

    spec = ModelSpec.from_dir(model_dir)
    configs = {"demo-small": spec.preprocess["audio"], "whisper-30s": {
        "feature_size": 80, "sampling_rate": 16000, "hop_length": 160, "n_fft": 400, "chunk_length": 30}}
    out = {}
    for name, cfg in configs.items():
        pre = AudioPreprocessor(cfg, audio_output_length, max_seconds=max(lengths) + 1)
        for seconds in lengths:
            pcm = pcm16(seconds, seed=7)
            stream = StreamingFeatures(AudioConfig.of(cfg), 24000)
            stream.feed(pcm16_samples(pcm))
            blob, wav = stream.finish().to_bytes(), pcm16_to_wav(pcm)
            whole, streamed = [], []
            for _ in range(trials):
                t0 = time.perf_counter()
                pre(wav)
                t1 = time.perf_counter()
                pre.from_features(blob)
                whole.append(t1 - t0)
                streamed.append(time.perf_counter() - t1)
            out[f"{name} {seconds:g}s"] = (statistics.median(whole), statistics.median(streamed))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", type=Path, default=Path("/tmp/tributary-bench/demo-small"))
    ap.add_argument("--seconds", default="2,10,30")
    ap.add_argument("--trials", type=int, default=3)
    args = ap.parse_args(argv)

    from openai import OpenAI

    from cache.embedded import EmbeddedRedis
    from models.demo import write_demo_model
    from tests.e2e.conftest import local_cluster

    if not (args.model_dir / "model.safetensors").exists():
        write_demo_model(args.model_dir, "small")
    lengths = [float(s) for s in args.seconds.split(",")]
    rows = {}
    with EmbeddedRedis(maxmemory="1gb") as server, tempfile.TemporaryDirectory() as tmp:
        with local_cluster(args.model_dir, server.url, Path(tmp), "--max-audio-seconds", str(max(lengths) + 1)) as c:
            c.wait_ready()
            client = OpenAI(base_url=f"{c.base_url}/v1", api_key="unused", max_retries=0, timeout=300)
            realtime_turn(client, c.model, pcm16(1.0, seed=0))  # warm both paths
            rest_turn(client, c.model, pcm16(1.0, seed=1))
            seed = 100
            for seconds in lengths:
                rt, rs = [], []
                for _ in range(args.trials):
                    rt.append(realtime_turn(client, c.model, pcm16(seconds, seed)))
                    rs.append(rest_turn(client, c.model, pcm16(seconds, seed + 1)))
                    seed += 2
                rows[seconds] = (statistics.median(rt), statistics.median(rs))
    costs = preprocess_costs(args.model_dir, lengths)
    print("encoder preprocessing per clip: the WAV (decode, resample, features) vs streamed features, medians in ms")
    for name, (whole, streamed) in costs.items():
        print(f"{name:>16}{1e3 * whole:>10.1f}{1e3 * streamed:>8.2f}")
    print(f"realtime (commit -> first delta) vs REST (request -> first chunk), demo-small, {args.trials} trials, "
          "medians in ms")
    print(f"{'clip':>8}{'realtime':>12}{'REST':>10}{'realtime / REST':>18}")
    for seconds, (rt, rs) in rows.items():
        print(f"{seconds:>7g}s{1e3 * rt:>12.0f}{1e3 * rs:>10.0f}{rt / rs:>18.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
