"""A mistake in what a command is given is one line naming it and a nonzero exit, never a traceback wall or a
process that waits forever (an outside operator's tour of the CLI found both)."""

from __future__ import annotations

import asyncio
import logging
import shutil
import subprocess
import sys

import pytest

from tributary.cli import main


def run(*argv: str, env: dict | None = None) -> tuple[int, str]:
    import os

    proc = subprocess.run([sys.executable, "-m", "tributary.cli", *argv], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})
    return proc.returncode, proc.stderr


@pytest.mark.parametrize("argv,env,words", [
    (["up", "--port", "70000"], {}, "argument --port: must be a port number, 1-65535, got '70000'"),
    (["up", "--port", "0"], {}, "argument --port: must be a port number"),
    (["up", "--max-inflight", "-1"], {}, "argument --max-inflight: must be an integer >= 1"),
    (["up", "--ready-timeout", "-1"], {}, "argument --ready-timeout: must be a number > 0"),
    (["up", "--shards", "0"], {}, "argument --shards: must be an integer >= 1"),
    (["up", "--log-level", "BOGUS"], {}, "argument --log-level: must be one of DEBUG"),
    (["up"], {"TRIBUTARY_MAX_INFLIGHT": "abc"}, "argument --max-inflight: must be an integer >= 1, got 'abc'"),
    (["up", "--token-timeout", "5"], {}, "argument --token-timeout: must be a number >= 10"),
    (["gateway", "--model", "m", "--redis-url", "redis://x"], {"TRIBUTARY_FIRST_TOKEN_TIMEOUT": "0"},
     "argument --first-token-timeout: must be a number > 0"),
    (["backbone", "--model", "m", "--redis-url", "redis://x", "--stall-timeout", "-1"], {},
     "argument --stall-timeout: must be a number > 0"),
    (["backbone", "--model", "m", "--redis-url", "redis://x", "--gpu-memory-utilization", "1.5"], {},
     "must be a number in (0, 1]"),
    (["encoder", "--model", "m", "--redis-url", "redis://x", "--modality", "image", "--device", "tpu"], {},
     "argument --device: must be cpu, cuda or cuda:N, got 'tpu'"),
    # NaN passed every bound (an outside tester's --encoder-max-wait-ms nan hung the image encoder); inf too
    (["up", "--encoder-max-wait-ms", "nan"], {}, "argument --encoder-max-wait-ms: must be a number >= 0, got 'nan'"),
    (["up", "--kv-cache-gb", "inf"], {}, "argument --kv-cache-gb: must be a number > 0, got 'inf'"),
    (["up"], {"TRIBUTARY_DRAIN_TIMEOUT": "NaN"}, "TRIBUTARY_DRAIN_TIMEOUT"),  # a worker's, checked by up first
])
def test_bad_flag_values_are_one_argparse_line(argv, env, words):
    code, err = run(*argv, env=env)
    assert code == 2 and words in err and "Traceback" not in err, err


def test_a_bad_environment_value_does_not_break_help():
    code, err = run("up", "--help", env={"TRIBUTARY_MAX_INFLIGHT": "abc"})
    assert code == 0 and "Traceback" not in err, err


@pytest.mark.parametrize("argv,words", [
    (["backbone", "--model", "m", "--redis-url", "redis://x", "--layers", "3:x"], "--layers must be A:B"),
    (["backbone", "--model", "m", "--redis-url", "redis://x", "--shard", "3", "--num-shards", "2"],
     "--shard 3 is not a shard of a replica of --num-shards 2"),
    (["export-onnx", "--model", "/nonexistent"], "/nonexistent has no config.json"),
    (["export-onnx", "--model", "LLAVA", "--modality", "audio"], "--modality audio: "),
    (["demo-model", "--out", "/dev/null/x"], "/dev/null/x"),
    # a device this machine does not have (no machine has 100 GPUs): torch's traceback from deep in the load before
    (["encoder", "--model", "m", "--redis-url", "redis://x", "--modality", "image", "--device", "cuda:99"],
     "--device cuda:99: "),
])
def test_what_cannot_work_is_one_line_with_status_2(argv, words, capsys, tmp_path):
    if "LLAVA" in argv:  # a checkpoint with an image encoder only
        from models.real_shapes import write_llava

        argv = [str(write_llava(tmp_path / "llava", "llava-tiny", 0)) if a == "LLAVA" else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_more_shards_than_layers_is_one_line_before_anything_starts(tiny_model):
    """Each shard failed at its start, and the cluster stopped after 17 s (an outside tester's --shards 5 on a
    model of 4 layers); up now says it before starting anything."""
    code, err = run("up", "--model", str(tiny_model), "--shards", "5", "--port", "1")
    assert code == 2 and "--shards 5: the model has 4 layers" in err and "Traceback" not in err, err


def test_onnx_encoders_in_16_bits_are_refused_by_up_naming_its_own_flags(tiny_model):
    """Each encoder refused it at its start, naming encoder flags up does not have (an outside tester's)."""
    code, err = run("up", "--model", str(tiny_model), "--encoder-runtime", "onnx", "--encoder-dtype", "bfloat16",
                    "--port", "1")
    assert code == 2 and "--encoder-runtime onnx computes in float32" in err and "--encoder-wire-dtype" in err, err


@pytest.mark.parametrize("missing,words", [(["chat_template.jinja"], "no chat template"), ([], "no chat template"),
                                           (["tokenizer.json"], "no tokenizer (tokenizer.json")])
def test_a_checkpoint_that_cannot_build_prompts_is_refused_before_anything_starts(tiny_model, tmp_path, missing,
                                                                                 words):
    """Without a chat template the cluster came up and answered every request 500 (an outside tester's); without
    a tokenizer transformers asked to install sentencepiece. up and the gateway both say what is missing."""
    model = tmp_path / "m"
    shutil.copytree(tiny_model, model)
    for name in missing:
        (model / name).unlink()
    if words == "no chat template" and missing == []:
        (model / "chat_template.jinja").write_text("  \n")  # empty: every prompt rendered empty
    for argv in (["up", "--model", str(model), "--port", "1"],
                 ["gateway", "--model", str(model), "--redis-url", "redis://127.0.0.1:1", "--port", "1"]):
        code, err = run(*argv)
        assert code == 2 and words in err and "Traceback" not in err, (argv, err)


def test_a_broken_checkpoint_names_its_file(tiny_model, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model, broken)
    (broken / "config.json").write_text("{")
    assert main(["export-onnx", "--model", str(broken)]) == 2
    assert f"{broken / 'config.json'}: not valid JSON" in capsys.readouterr().err
    (broken / "config.json").write_text((tiny_model / "config.json").read_text())
    (broken / "model.safetensors").write_bytes((tiny_model / "model.safetensors").read_bytes()[:1000])
    assert main(["export-onnx", "--model", str(broken)]) == 2
    assert f"{broken / 'model.safetensors'}: not a readable safetensors file" in capsys.readouterr().err


def test_a_gateway_whose_port_is_taken_says_so_at_once(tiny_model):
    import socket

    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        code, err = run("gateway", "--model", str(tiny_model), "--redis-url", "redis://127.0.0.1:1", "--port",
                        str(port))
    assert code == 2 and f"cannot listen on 127.0.0.1:{port}" in err and "Traceback" not in err, err


def test_background_tasks_stop_even_when_a_cancellation_is_lost(caplog):
    """redis-py, cancelled while it connects, can carry on with the command: the cancellation is lost, and a
    gateway that could not bind its port hung in its shutdown for good. ``stop_tasks`` cancels again until a task
    ends, and leaves (logged) one that never does."""
    from gateway.app import stop_tasks

    async def deaf_once():  # loses the first cancellation, as redis-py did
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            pass
        while True:
            await asyncio.sleep(0.05)

    released = []

    async def deaf():  # loses every cancellation (until the test releases it)
        while not released:
            try:
                await asyncio.sleep(0.05)
            except asyncio.CancelledError:
                continue

    async def scenario():
        once, never = asyncio.create_task(deaf_once(), name="once"), asyncio.create_task(deaf(), name="never")
        await asyncio.sleep(0)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with caplog.at_level(logging.ERROR, logger="gateway.app"):
            await stop_tasks([once, never], timeout_s=1.5)
        took = loop.time() - t0
        done = once.done(), never.done()
        released.append(1)
        await never
        return done, took

    (once_stopped, never_done), took = asyncio.run(scenario())
    assert once_stopped and not never_done and took < 3
    assert any("did not stop" in r.getMessage() for r in caplog.records)


def test_a_gateway_background_loop_that_ends_stops_the_gateway_but_a_cancelled_one_does_not(caplog):
    """The reply reader (or the monitor) ending with an error left every request to wait out its timeout while
    /health said ok: the process now stops itself as SIGTERM stops it, to be restarted."""
    import os
    import signal

    from gateway.app import _stop_if_ended

    signals = []
    previous = signal.signal(signal.SIGTERM, lambda *_: signals.append(os.getpid()))

    async def broken():
        raise RuntimeError("a bug in the loop")

    async def scenario():
        ended, stopped = asyncio.create_task(broken(), name="replies"), asyncio.create_task(asyncio.sleep(60))
        for task in (ended, stopped):
            task.add_done_callback(_stop_if_ended)
        stopped.cancel()
        await asyncio.gather(ended, stopped, return_exceptions=True)
        await asyncio.sleep(0.05)  # the callbacks run, then the handler in this (the main) thread

    try:
        with caplog.at_level(logging.CRITICAL, logger="gateway.app"):
            asyncio.run(scenario())
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert signals == [os.getpid()]
    record, = [r for r in caplog.records if r.levelno == logging.CRITICAL]
    assert record.task == "replies" and record.error == "RuntimeError: a bug in the loop"


def test_hang_timeout_0_turns_the_watchdogs_off_as_its_help_says():
    from tributary.cli import build_parser

    assert build_parser().parse_args(["up", "--hang-timeout", "0"]).hang_timeout == 0


def test_tributary_redis_creates_its_dir(tmp_path):
    """``tributary redis --dir D`` with D missing failed on its config file; it is created now. The server is
    started (a free port, no password) and answers."""
    import os
    import signal
    import time

    import redis as redis_py

    from cache.embedded import free_port

    folder, port = tmp_path / "not" / "yet", free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tributary.cli", "redis", "--port", str(port), "--dir",
                             str(folder), "--allow-no-password"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={k: v for k, v in os.environ.items() if k != "TRIBUTARY_REDIS_PASSWORD_FILE"})
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                assert redis_py.Redis(port=port, socket_connect_timeout=0.5).ping()
                break
            except redis_py.ConnectionError:
                assert proc.poll() is None, proc.stderr.read().decode()
                assert time.monotonic() < deadline, "no answer"
                time.sleep(0.1)  # the server starts
        assert folder.is_dir()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def test_a_gateway_refused_by_redis_for_its_password_stops_at_once(tiny_model):
    """A wrong password never clears: a standalone gateway ran on with /ready 503 (a previous note's finding). It
    now stops with one line; a Redis that is only not up yet still lets it start (tested above: port taken)."""
    from cache.embedded import EmbeddedRedis

    with EmbeddedRedis(maxmemory="16mb", password="right") as server:
        wrong = server.url.replace(":right@", ":wrong@")
        code, err = run("gateway", "--model", str(tiny_model), "--redis-url", wrong, "--port", "1")
    assert code == 2 and "Redis: authentication failed" in err and "Traceback" not in err, err


def test_a_gateway_whose_redis_url_names_a_server_that_is_not_redis_stops_at_once(tiny_model):
    """An outside operator's --redis-url named an HTTP port: ``up`` said ``Protocol error, got "H"``, and a
    standalone gateway logged ``"error": "error"`` and served 503s for good. Both now say what it is, and the
    gateway stops (it never clears)."""
    import socket
    import threading

    from cache.embedded import free_port

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def http():
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                conn.recv(1024)
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")

    threading.Thread(target=http, daemon=True).start()
    try:
        url = f"redis://127.0.0.1:{port}"
        code, err = run("gateway", "--model", str(tiny_model), "--redis-url", url, "--port", "1")
        assert code == 2 and "not a Redis server" in err and "Traceback" not in err, err
        code, err = run("up", "--model", str(tiny_model), "--redis-url", url, "--port", str(free_port()))
        assert code == 1 and "not a Redis server" in err and "Traceback" not in err, err
    finally:
        listener.close()
