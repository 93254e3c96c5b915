"""Every Redis key Tributary uses, in one place (prefix configurable, default ``trib``).

Redis Cluster: keys that must meet in one script or one ordered pipeline share a hash tag (the part in braces picks
the slot). A tensor, its waiters, its lease and its media blob are tagged with the content digest, so the publisher
writes the tensor and takes the waiters on one node, in order; a gateway's reply stream, its ``:alive`` lease and its
requests' ``:cancel:`` keys are tagged with the gateway id, so "write only while alive" is one script. Everything
else is a single key. A prefix holding braces would put every key in one slot (correct, but one node does all the work).

Streams ``jobs`` and ``gen`` carry no TTL (their entries are deleted when acked); a gateway's ``reply`` stream expires
with its lease; tensors and blobs always do, so a server configured with a
``volatile-*`` eviction policy evicts cached tensors under memory pressure and never a queue.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Keys:
    prefix: str = "trib"

    def jobs(self, modality: str) -> str:
        """Stream of EncodeJobs for one modality; consumer group :data:`ENCODER_GROUP`."""
        return f"{self.prefix}:jobs:{modality}"

    def gen(self) -> str:
        """Stream of PromptPlans; consumer group :data:`BACKBONE_GROUP`."""
        return f"{self.prefix}:gen"


    def queue(self, tier: str) -> tuple[str, str]:
        """A tier's work queue: (its stream, its consumer group). ``backbone`` reads prompt plans from ``gen``;
        ``encoder:<modality>`` reads jobs from ``jobs:<modality>``."""
        if tier == "backbone":
            return self.gen(), BACKBONE_GROUP
        return self.jobs(tier.split(":", 1)[1]), ENCODER_GROUP
    def reply(self, gateway_id: str) -> str:
        """Per-gateway-process stream of encode results and token events."""
        return f"{self.prefix}:reply:{{{gateway_id}}}"

    def tensor(self, encoder_id: str, digest: str) -> str:
        """Hash ``{data: safetensors bytes, n: placeholder count}`` with a TTL."""
        return f"{self.prefix}:t:{encoder_id}:{{{digest}}}"

    def waiters(self, encoder_id: str, digest: str) -> str:
        """Set of reply streams to notify when this tensor is published (or fails)."""
        return f"{self.prefix}:w:{encoder_id}:{{{digest}}}"

    def lease(self, encoder_id: str, digest: str) -> str:
        """Held (SET NX, TTL) by the one gateway that queued this tensor's encode job: single flight."""
        return f"{self.prefix}:lease:{encoder_id}:{{{digest}}}"

    def media_id(self, encoder_id: str, media_uuid: str, namespace: str = "") -> str:
        """A client-chosen media ``uuid`` -> the content digest it was first sent with (TTL of the tensor), per
        tenant cache namespace (none without API keys). The namespace goes in with its length, so no pair of a
        namespace and a uuid (either may hold ":") spells another pair's key."""
        return f"{self.prefix}:uuid:{encoder_id}:{len(namespace)}:{namespace}:{media_uuid}"

    def blob(self, digest: str, kind: str = "media") -> str:
        """Raw media bytes (``kind`` media) or features computed from them, waiting for an encoder, short TTL."""
        blob = f"{self.prefix}:blob:{{{digest}}}"
        return blob if kind == "media" else f"{blob}:{kind}"

    def dead_letter(self) -> str:
        """Stream of work given up on (delivered to too many workers that died): payload, source stream, reason."""
        return f"{self.prefix}:dead"

    def live(self, tier: str) -> str:
        """Sorted set of worker ids scored by their last heartbeat (unix seconds)."""
        return f"{self.prefix}:live:{tier}"

    def encoder_ids(self, modality: str) -> str:
        """Hash of the modality's encoder workers (their ids) to the encoder id each computes (checkpoint, compute
        and wire dtype): a worker handed a job for another id hands it back while a live worker has that id."""
        return f"{self.prefix}:encoders:{modality}"

    def budget(self, tier: str) -> str:
        """Threads each of a tier's processes should use (``tributary up``'s CPU budget, re-divided as its autoscaler
        adds and removes processes), with a TTL the autoscaler refreshes. In the live set's slot: a worker's
        heartbeat (its ZADD there, a GET of this) is one node's round trip, so a Redis Cluster node that does not
        answer, holding neither, never fails a beat (an outside tester's chaos run: every worker looked dead, and
        the watchdog killed them all)."""
        live = self.live(tier)
        return f"{live}:budget" if "{" in self.prefix else f"{{{live}}}:budget"

    def stats(self, tier: str) -> str:
        """Hash of monotonically increasing counters a tier keeps (jobs, encoder calls, tokens, cancels)."""
        return f"{self.prefix}:stats:{tier}"

    def autoscale(self) -> str:
        """Hash ``{<tier>: replicas, <tier>:recommended: n}`` that ``tributary up --autoscale`` keeps (TTL), which the
        metrics leader exports (``tributary_autoscaler_replicas``, ``tributary_autoscaler_recommended``)."""
        return f"{self.prefix}:autoscale"

    def metrics_leader(self) -> str:
        """The gateway (or set of gateway processes) exporting the queues' metrics: a lease of a few seconds, taken
        when free and renewed by its holder (gateway/metrics.py), so summing over gateways never counts a queue
        twice."""
        return f"{self.prefix}:metrics:leader"


def alive(reply_stream: str) -> str:
    """A gateway's lease (SET with a TTL, refreshed every second), named after its reply stream so that a worker
    holding only ``reply_to`` can tell a live gateway from a dead one. Workers never write to the reply stream of a
    gateway whose lease lapsed, and cancel its requests' work."""
    return f"{reply_stream}:alive"


def cancel(reply_stream: str, request_id: str) -> str:
    """Set (with a TTL) to the lowest attempt of the request still wanted: attempts below it are cancelled (a
    migration moved the request on), and ``CANCEL_ALL`` cancels every attempt (client gone, stop string). Named
    after (and in the slot of) the reply stream of the gateway that owns the request: a backbone checking it also
    checks that gateway's lease and writes to that stream, so one Redis Cluster node serves all three, and a node
    away holds only the requests of gateways whose keys live there (an outside tester's chaos run: a text-only
    request failed on a node it did not otherwise use)."""
    return f"{reply_stream}:cancel:{request_id}"


CANCEL_ALL = 1 << 30  # the cancel key's value that cancels every attempt of a request
ENCODER_GROUP = "encoders"
BACKBONE_GROUP = "backbone"
