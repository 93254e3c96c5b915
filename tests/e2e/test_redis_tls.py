"""End to end over TLS to Redis with a client certificate: every tier of a cluster talks ``rediss://`` to a TLS
endpoint that requires a client certificate signed by the test's CA, with a password.

The Valkey binary the tests use is built without TLS, so the endpoint is a TLS-terminating proxy in front of it
(Python's ``ssl``, ``CERT_REQUIRED``); what is under test is the product's side: the URL's ``ssl_ca_certs`` /
``ssl_certfile`` / ``ssl_keyfile`` options reaching every process's Redis client.
"""

from __future__ import annotations

import asyncio
import ssl
import threading

import pytest
import redis
from openai import OpenAI

from cache.embedded import EmbeddedRedis, free_port
from tests.e2e.conftest import local_cluster
from tests.media import data_url, png_bytes

pytestmark = pytest.mark.slow
trustme = pytest.importorskip("trustme")


class TlsProxy:
    """TLS (client certificate required) on ``port`` -> plaintext ``target`` port, on its own event loop thread."""

    def __init__(self, context: ssl.SSLContext, target: int):
        self.context, self.target, self.port = context, target, free_port()
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(
            asyncio.start_server(self._client, "127.0.0.1", self.port, ssl=self.context))
        self.ready.set()
        self.loop.run_forever()

    async def _client(self, reader, writer) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            writer.close()
            return

        async def pipe(src, dst):
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def __enter__(self) -> TlsProxy:
        self.thread.start()
        self.ready.wait(10)
        return self

    def __exit__(self, *exc) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def test_a_cluster_over_tls_with_a_client_certificate(tiny_model, tmp_path):
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    ca.configure_trust(server_ctx)
    server_ctx.verify_mode = ssl.CERT_REQUIRED  # no client certificate, no connection
    ca_file, client_file = tmp_path / "ca.pem", tmp_path / "client.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    ca.issue_cert("tributary-client").private_key_and_cert_chain_pem.write_to_path(str(client_file))
    with EmbeddedRedis(password="tls-pw") as server, TlsProxy(server_ctx, server.port) as proxy:
        base = f"rediss://:tls-pw@127.0.0.1:{proxy.port}/0?ssl_ca_certs={ca_file}"
        url = f"{base}&ssl_certfile={client_file}"
        assert redis.Redis.from_url(url).ping()
        with pytest.raises(redis.ConnectionError):  # the proxy really asks for the certificate
            redis.Redis.from_url(base).ping()
        with local_cluster(tiny_model, url, tmp_path, "--encoder-max-wait-ms", "20") as c:
            c.wait_ready()
            client = OpenAI(base_url=f"{c.base_url}/v1", api_key="unused", max_retries=0, timeout=60)
            answer = client.chat.completions.create(model=c.model, max_tokens=4, messages=[{"role": "user", "content": [
                {"type": "text", "text": "what is it?"},
                {"type": "image_url", "image_url": {"url": data_url(png_bytes(24, 24, seed=91))}}]}])
            assert answer.usage.completion_tokens > 0
            assert c.stats("encoder:image").get("encoder_calls", 0) == 1  # the encoder tier went through TLS too
            log = c.log_path.read_text()
            assert "tls-pw" not in log
