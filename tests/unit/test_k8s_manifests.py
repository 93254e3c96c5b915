"""deploy/k8s: the Kubernetes manifests, rendered as kustomize renders them, against the Kubernetes schemas
(kubernetes-validate's bundled ones, offline, strict), KEDA's models (cloudcoil-models-keda), and Tributary itself:
every container's command line goes through the real ``tributary`` parser, every ScaledObject names the stream and
consumer group its tier reads (cache/keys.py), probes name gateway routes, secrets resolve, PDBs select workloads.

The kustomizations are rendered here in Python (resources, strategic-merge ``patches``, ``namespace``, ``images``:
what deploy/k8s uses, nothing else); where kubectl is on PATH, one test checks that render against ``kubectl
kustomize``."""
from __future__ import annotations

import contextlib
import copy
import io
import os
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import kubernetes_validate  # the dev extra installs these (pyproject.toml); a missing one is an error, not a skip
import pytest
import yaml
from cloudcoil.models.keda import v1alpha1 as keda

from cache.keys import BACKBONE_GROUP, ENCODER_GROUP, Keys
from router.autoscale import ScalingPolicy

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
README = K8S / "README.md"
OVERLAYS = {"base": K8S / "base", "gpu": K8S / "overlays" / "gpu", "pipeline": K8S / "overlays" / "pipeline",
            "redis-cluster": K8S / "overlays" / "redis-cluster"}
KUBERNETES_VERSION = "1.30.0"  # the oldest release the manifests target (the pod-index label needs 1.28)
KEDA_KINDS = {"ScaledObject", "TriggerAuthentication"}
CLUSTER_SCOPED = {"Namespace"}
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "Job"}
REDIS_CLIENTS = {"gateway", "encoder", "backbone", "redis"}  # subcommands that read the Redis password file


# --- rendering ----------------------------------------------------------------------------------------------------

_KUSTOMIZATION_KEYS = {"apiVersion", "kind", "namespace", "resources", "patches", "images"}
_MERGE_BY_NAME = {"containers", "initContainers", "env", "volumes"}  # the strategic-merge keys the patches use


def _load(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _merge(base: dict, patch: dict) -> dict:
    """A strategic merge patch, as far as deploy/k8s uses it: maps merge key by key, lists of containers, env and
    volumes merge by name (new items first), other lists are replaced, null deletes."""
    out = dict(base)
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        elif key in _MERGE_BY_NAME and isinstance(out.get(key), list):
            merged, added = list(out[key]), []
            for item in value:
                at = next((i for i, old in enumerate(merged) if old["name"] == item["name"]), None)
                if at is None:
                    added.append(item)
                else:
                    merged[at] = _merge(merged[at], item)
            out[key] = added + merged  # kustomize puts the new items first
        else:
            out[key] = value
    return out


def _same(doc: dict, patch: dict) -> bool:
    group = lambda d: d["apiVersion"].rpartition("/")[0]  # noqa: E731
    return (doc["kind"], doc["metadata"]["name"], group(doc)) == (
        patch["kind"], patch["metadata"]["name"], group(patch))


def _split_image(image: str) -> tuple[str, str]:
    slash = image.rfind("/")
    colon = image.rfind(":")
    return (image[:colon], image[colon + 1:]) if colon > slash else (image, "latest")


def render(path: Path) -> list[dict]:
    """What ``kubectl kustomize path`` prints, as a list of documents."""
    kust = yaml.safe_load((path / "kustomization.yaml").read_text())
    unknown = set(kust) - _KUSTOMIZATION_KEYS
    assert not unknown, f"{path}: this test's renderer does not handle {sorted(unknown)}: extend render()"
    docs: list[dict] = []
    for entry in kust.get("resources", []):
        target = path / entry
        docs += render(target) if target.is_dir() else _load(target)
    for patch_entry in kust.get("patches", []):
        assert set(patch_entry) == {"path"}, f"{path}: only file patches (strategic merge) are rendered here"
        for patch in _load(path / patch_entry["path"]):
            matches = [d for d in docs if _same(d, patch)]
            assert len(matches) == 1, f"{path}: patch {patch['kind']}/{patch['metadata']['name']} matches " \
                                      f"{len(matches)} resources"
            if patch.get("$patch") == "delete":
                docs.remove(matches[0])
            else:
                docs[docs.index(matches[0])] = _merge(matches[0], patch)
    docs = copy.deepcopy(docs)
    if namespace := kust.get("namespace"):
        for doc in docs:
            if doc["kind"] not in CLUSTER_SCOPED:
                doc["metadata"]["namespace"] = namespace
    for image in kust.get("images", []):
        for doc in docs:
            for container in _all_containers(doc):
                name, tag = _split_image(container["image"])
                if name == image["name"]:
                    container["image"] = f"{image.get('newName', name)}:{image.get('newTag', tag)}"
    return docs


class _Rendered(dict):
    """overlay name -> its rendered documents, rendered on first use."""

    def __missing__(self, overlay: str) -> list[dict]:
        self[overlay] = render(OVERLAYS[overlay])
        return self[overlay]


RENDERED = _Rendered()


# --- reading the rendered documents -------------------------------------------------------------------------------

def _pod_spec(doc: dict) -> dict | None:
    return doc["spec"]["template"]["spec"] if doc["kind"] in WORKLOAD_KINDS else None


def _all_containers(doc: dict) -> list[dict]:
    spec = _pod_spec(doc)
    return [] if spec is None else spec.get("initContainers", []) + spec["containers"]


def _find(docs: list[dict], kind: str, name: str) -> dict:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def _workloads(docs: list[dict]) -> list[dict]:
    return [d for d in docs if d["kind"] in WORKLOAD_KINDS]


def _env(docs: list[dict], container: dict, ordinal: int = 0) -> dict[str, str]:
    """The container's environment as Kubernetes sets it (ConfigMaps resolved; a pod-index fieldRef is the
    ordinal; secrets stay out: they are not flags)."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        assert set(source) == {"configMapRef"}, source
        env.update(_find(docs, "ConfigMap", source["configMapRef"]["name"])["data"])
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
        elif "fieldRef" in var["valueFrom"]:
            path = var["valueFrom"]["fieldRef"]["fieldPath"]
            assert path == "metadata.labels['apps.kubernetes.io/pod-index']", path
            env[var["name"]] = str(ordinal)
    return env


def _expand(word: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion in command and args."""
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m.group(1), m.group(0)), word)


def _invocations(container: dict, env: dict[str, str]) -> list[list[str]]:
    """Each `tributary ...` command line the container runs (the image's ENTRYPOINT is ``tributary``; a ``sh -c``
    script is split at its operators)."""
    command, args = container.get("command"), container.get("args", [])
    if command is None:
        words = [["tributary", *args]]
    elif command[:2] == ["sh", "-c"]:
        assert not args and len(command) == 3, command
        lex = shlex.shlex(command[2], posix=True, punctuation_chars=True)
        lex.whitespace_split = True
        words, current = [], []
        for token in [*lex, ";"]:
            if token in {";", "||", "&&", "|", "&"}:
                words.append(current)
                current = []
            else:
                current.append(token)
        words = [w[1:] if w[:1] == ["exec"] else w for w in words]
    else:
        words = [[*command, *args]]
    return [[_expand(w, env) for w in line] for line in words if line and line[0] == "tributary"]


def _parse(argv: list[str], env: dict[str, str], monkeypatch):
    """``tributary.cli.build_parser()``, built under the container's environment (its TRIBUTARY_* variables are the
    flags' defaults and decide which flags are required), parses ``argv``."""
    from tributary.cli import build_parser

    with monkeypatch.context() as m:
        for name in [n for n in os.environ if n.startswith("TRIBUTARY_")]:
            m.delenv(name)
        for name, value in env.items():
            m.setenv(name, value)
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
                return build_parser().parse_args(argv[1:])
        except SystemExit:
            pass
    pytest.fail(f"`{' '.join(argv)}` is not a valid tributary command line: {err.getvalue().strip()}")


@dataclass
class Process:
    """One `tributary` command line of one container of one workload (a StatefulSet gives one per ordinal)."""
    workload: dict
    container: dict
    env: dict[str, str]
    args: object
    ordinal: int = 0
    ports: dict = field(default_factory=dict)


def _processes(docs: list[dict], monkeypatch) -> list[Process]:
    found = []
    for doc in _workloads(docs):
        ordinals = range(doc["spec"]["replicas"]) if doc["kind"] == "StatefulSet" else range(1)
        for container in _pod_spec(doc)["containers"]:
            for ordinal in ordinals:
                env = _env(docs, container, ordinal)
                lines = _invocations(container, env)
                assert lines, f"{doc['metadata']['name']}/{container['name']} runs no tributary command"
                for line in lines:
                    ports = {p.get("name"): p["containerPort"] for p in container.get("ports", [])}
                    found.append(Process(doc, container, env, _parse(line, env, monkeypatch), ordinal, ports))
    return found


def _port(container: dict, port) -> int:
    if isinstance(port, int):
        return port
    return next(p["containerPort"] for p in container.get("ports", []) if p.get("name") == port)


def _selects(selector: dict, labels: dict) -> bool:
    return selector.items() <= labels.items()


def _on_cluster(env: dict[str, str]) -> bool:
    """A Redis Cluster the user runs (overlays/redis-cluster): no Redis among the manifests."""
    return env.get("TRIBUTARY_REDIS_CLUSTER") == "yes"


def _redis_service(docs: list[dict], env: dict[str, str]) -> tuple[dict, int]:
    url = urlsplit(env["TRIBUTARY_REDIS_URL"])
    if _on_cluster(env):
        return {"metadata": {"name": url.hostname}, "spec": {"ports": [{"port": url.port}]}}, 0
    service = _find(docs, "Service", url.hostname)
    assert url.port in [p["port"] for p in service["spec"]["ports"]]
    return service, int(url.path.strip("/") or 0)


# --- the manifests against the schemas ----------------------------------------------------------------------------

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_render_matches_kubectl_kustomize(overlay):
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: the Python render is not cross-checked")
    out = subprocess.run([kubectl, "kustomize", str(OVERLAYS[overlay])], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    key = lambda d: (d["kind"], d["metadata"]["name"])  # noqa: E731
    assert sorted(_load_text(out.stdout), key=key) == sorted(RENDERED[overlay], key=key)


def _load_text(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_resource_is_valid_against_the_kubernetes_schemas(overlay):
    checked = set()
    for doc in RENDERED[overlay]:
        if doc["kind"] in KEDA_KINDS:
            continue
        error = None
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            error = f"{doc['kind']}/{doc['metadata']['name']}: {exc.message} at {list(exc.path)}"
        assert error is None, error
        checked.add(doc["kind"])
    assert {"Deployment", "Service", "PodDisruptionBudget", "Job", "ConfigMap"} <= checked


def test_the_schema_check_runs_offline_and_rejects_a_wrong_field():
    doc = copy.deepcopy(_find(RENDERED["base"], "Deployment", "gateway"))
    doc["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGett"] = {"path": "/health"}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def _keda_model(doc: dict):
    """The KEDA resource as cloudcoil's model of it; fails on a field KEDA does not have (the models ignore unknown
    fields, so the document must survive the round trip unchanged) or a value of the wrong type."""
    model = getattr(keda, doc["kind"]).model_validate(doc)
    back = model.model_dump(by_alias=True, exclude_unset=True, mode="json")
    assert back == doc, f"{doc['kind']}/{doc['metadata']['name']} has fields or values KEDA's schema does not " \
                        f"take:\n{doc}\nread as\n{back}"
    return model


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_keda_resources_are_valid_keda_objects(overlay):
    kinds = [d["kind"] for d in RENDERED[overlay] if d["apiVersion"].startswith("keda.sh/")]
    assert set(kinds) == KEDA_KINDS
    for doc in RENDERED[overlay]:
        if doc["kind"] in KEDA_KINDS:
            assert doc["apiVersion"] == "keda.sh/v1alpha1"
            _keda_model(doc)


def test_the_keda_check_rejects_a_wrong_field():
    doc = copy.deepcopy(_find(RENDERED["base"], "ScaledObject", "backbone"))
    doc["spec"]["minReplicas"] = 1  # the HPA's name, not KEDA's (minReplicaCount)
    with pytest.raises(AssertionError, match="does not take"):
        _keda_model(doc)
    doc = copy.deepcopy(_find(RENDERED["base"], "ScaledObject", "backbone"))
    doc["spec"]["triggers"][0]["metadata"]["lagCount"] = 16  # trigger metadata is strings only
    with pytest.raises(Exception):
        _keda_model(doc)


# --- the manifests against Tributary ------------------------------------------------------------------------------

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_runs_a_valid_tributary_command(overlay, monkeypatch):
    docs = RENDERED[overlay]
    by_name = {}
    for proc in _processes(docs, monkeypatch):
        name = proc.workload["metadata"]["name"]
        by_name.setdefault(name, []).append(proc)
        a = proc.args
        if a.command in REDIS_CLIENTS - {"redis"}:
            assert Path(a.model) == Path(proc.env["TRIBUTARY_MODEL"])
        if a.command == "gateway":
            assert a.host == "0.0.0.0" and a.port == proc.ports["http"]
            service = _find(docs, "Service", name)
            assert _port(proc.container, service["spec"]["ports"][0]["targetPort"]) == a.port
        elif a.command in {"encoder", "backbone"}:
            assert a.metrics_host == "0.0.0.0" and a.metrics_port == proc.ports["metrics"]
            annotations = proc.workload["spec"]["template"]["metadata"]["annotations"]
            assert annotations["prometheus.io/port"] == str(a.metrics_port)
            assert annotations["prometheus.io/path"] == "/metrics"
        elif a.command == "redis":
            assert a.bind == "0.0.0.0" and a.port == proc.ports["redis"]
            service, _ = _redis_service(docs, proc.env)
            assert service["metadata"]["name"] == name
            assert _port(proc.container, service["spec"]["ports"][0]["targetPort"]) == a.port
        elif a.command == "demo-model":
            assert proc.workload["kind"] == "Job" and a.out == Path(proc.env["TRIBUTARY_MODEL"])
        else:
            pytest.fail(f"{name} runs `tributary {a.command}`, which no manifest should")
        if a.command in REDIS_CLIENTS:
            _redis_service(docs, proc.env)
    expected = {"redis", "model-init", "gateway", "encoder-image", "encoder-audio",
                "backbone-pipeline" if overlay == "pipeline" else "backbone"} - ({"redis"} if overlay ==
                                                                                 "redis-cluster" else set())
    assert set(by_name) == expected
    modalities = {p.args.modality for n in ("encoder-image", "encoder-audio") for p in by_name[n]}
    assert modalities == {"image", "audio"}


def test_the_command_check_rejects_a_bad_flag(monkeypatch):
    doc = copy.deepcopy(_find(RENDERED["base"], "Deployment", "encoder-image"))
    doc["spec"]["template"]["spec"]["containers"][0]["args"] += ["--max-batchsize", "8"]
    config = _find(RENDERED["base"], "ConfigMap", "tributary")
    with pytest.raises(pytest.fail.Exception, match="not a valid tributary command line"):
        _processes([doc, config], monkeypatch)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_scaled_objects_follow_their_tiers_stream_and_consumer_group(overlay, monkeypatch):
    docs = RENDERED[overlay]
    policy = ScalingPolicy()
    procs = {p.workload["metadata"]["name"]: p for p in _processes(docs, monkeypatch)}
    scaled = [d for d in docs if d["kind"] == "ScaledObject"]
    namespace = {d["metadata"]["namespace"] for d in docs if d["kind"] not in CLUSTER_SCOPED}
    assert len(namespace) == 1, f"one namespace for everything, got {namespace}"
    for so in scaled:
        spec = _keda_model(so).spec
        target = spec.scale_target_ref
        assert (target.api_version, target.kind) == ("apps/v1", "Deployment"), "only Deployments autoscale"
        deployment = _find(docs, "Deployment", target.name)
        assert "replicas" not in deployment["spec"], f"{target.name}: the HPA owns the count, leave replicas out"
        proc = procs[target.name]
        a = proc.args
        keys = Keys(a.prefix)
        if a.command == "encoder":
            stream, group, per_replica = keys.jobs(a.modality), ENCODER_GROUP, a.max_batch
        else:
            assert a.command == "backbone", f"{target.name} is not a worker tier"
            assert a.num_shards == 1, "only single-shard backbones autoscale"
            stream, group, per_replica = keys.gen(), BACKBONE_GROUP, a.max_running
        # Two triggers, the HPA takes the larger: the backlog (lag) and the work in hand (pending); lag alone
        # drifts down while a tier keeps up.
        assert [t.name for t in spec.triggers] == ["backlog", "in-flight"]
        cluster = _on_cluster(proc.env)
        address = "addresses" if cluster else "address"  # a cluster: any nodes, KEDA finds the stream's slot
        assert all(t.type == ("redis-cluster-streams" if cluster else "redis-streams") for t in spec.triggers)
        for t in spec.triggers:
            assert (t.metadata["stream"], t.metadata["consumerGroup"]) == (stream, group)
            assert t.metadata[address] == spec.triggers[0].metadata[address]
        trigger = spec.triggers[0]
        meta = trigger.metadata
        assert meta["lagCount"] == str(per_replica), "lagCount: the backlog one replica takes on at once"
        assert int(meta["activationLagCount"]) >= 0
        assert spec.triggers[1].metadata["pendingEntriesCount"] == str(per_replica)
        assert spec.triggers[1].authentication_ref.name == trigger.authentication_ref.name
        service, db = _redis_service(docs, proc.env)
        host, _, port = meta[address].split(",")[0].rpartition(":")
        assert host in {f"{service['metadata']['name']}.{ns}.svc{tail}" for ns in namespace
                        for tail in ("", ".cluster.local")}, "KEDA dials Redis from its own namespace"
        assert int(port) in [p["port"] for p in service["spec"]["ports"]]
        assert int(meta.get("databaseIndex", 0)) == db
        assert 1 <= spec.min_replica_count <= spec.max_replica_count, "scale-from-zero is not supported"
        behavior = spec.advanced.horizontal_pod_autoscaler_config.behavior
        assert behavior.scale_up.stabilization_window_seconds == policy.upscale_delay_s
        assert behavior.scale_down.stabilization_window_seconds == policy.downscale_delay_s
        assert [(p.type, p.value) for p in behavior.scale_up.policies] == [("Pods", policy.max_step_up)]
        assert [(p.type, p.value) for p in behavior.scale_down.policies] == [("Pods", policy.max_step_down)]
        auth = _find(docs, "TriggerAuthentication", trigger.authentication_ref.name)
        assert [r["parameter"] for r in auth["spec"]["secretTargetRef"]] == ["password"]
    autoscaled = {so["spec"]["scaleTargetRef"]["name"] for so in scaled}
    workers = {name for name, p in procs.items()
               if p.args.command == "encoder" or (p.args.command == "backbone" and p.args.num_shards == 1)}
    assert autoscaled == workers, "a ScaledObject for each encoder tier and single-shard backbone, no other"
    for proc in procs.values():
        if proc.args.command == "backbone" and proc.args.num_shards > 1:
            assert proc.workload["kind"] == "StatefulSet" and proc.workload["metadata"]["name"] not in autoscaled


def test_the_pipeline_is_a_statefulset_whose_ordinal_is_the_shard(monkeypatch):
    docs = RENDERED["pipeline"]
    shards = [p for p in _processes(docs, monkeypatch) if p.args.command == "backbone"]
    sts = shards[0].workload
    assert sts["kind"] == "StatefulSet" and sts["spec"]["podManagementPolicy"] == "Parallel"
    assert sorted(p.args.shard for p in shards) == list(range(sts["spec"]["replicas"]))
    assert all(p.args.shard == p.ordinal and p.args.num_shards == sts["spec"]["replicas"] for p in shards)
    url = {urlsplit(p.args.dist_url) for p in shards}
    assert len(url) == 1, "every shard of a replica gives the same --dist-url"
    url = url.pop()
    name, service_name = sts["metadata"]["name"], sts["spec"]["serviceName"]
    assert url.scheme == "tcp" and url.hostname == f"{name}-0.{service_name}", "shard 0's stable DNS name"
    assert url.port == shards[0].ports["rendezvous"]
    service = _find(docs, "Service", service_name)
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    assert _selects(service["spec"]["selector"], sts["spec"]["template"]["metadata"]["labels"])
    assert url.port in [p["port"] for p in service["spec"]["ports"]]
    assert not any(d["kind"] == "Deployment" and d["metadata"]["name"] == "backbone" for d in docs)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gpus_go_where_the_overlay_says(overlay, monkeypatch):
    for proc in _processes(RENDERED[overlay], monkeypatch):
        gpus = int(proc.container["resources"].get("limits", {}).get("nvidia.com/gpu", 0))
        device = getattr(proc.args, "device", None)
        if overlay in ("gpu", "pipeline") and proc.args.command == "backbone":
            assert gpus == 1 and device == "cuda", f"{overlay}: a backbone pod on one GPU, --device cuda"
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in \
                _pod_spec(proc.workload)["tolerations"]
        else:
            assert gpus == 0 and device in {None, "cpu", "auto"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_workers_outlast_their_drain_and_have_probes(overlay, monkeypatch):
    gateway_routes = set(re.findall(r'Route\("(/[^"]*)"', (ROOT / "gateway" / "app.py").read_text()))
    assert {"/health", "/ready"} <= gateway_routes
    for proc in _processes(RENDERED[overlay], monkeypatch):
        spec, c, a = _pod_spec(proc.workload), proc.container, proc.args
        grace = spec.get("terminationGracePeriodSeconds", 30)
        if a.command == "gateway":
            assert c["livenessProbe"]["httpGet"]["path"] == "/health"
            # This gateway's part only: a tier without a worker must not take every gateway out of the Service.
            assert c["readinessProbe"]["httpGet"]["path"] == "/ready?scope=gateway"
            for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
                assert c[probe]["httpGet"]["path"].split("?")[0] in gateway_routes
                assert _port(c, c[probe]["httpGet"]["port"]) == a.port
            pause = c["lifecycle"]["preStop"]["exec"]["command"]
            # The pause, then the graceful timeout, then the 503s of the streams still open, inside the grace period.
            assert pause[0] == "sleep" and int(pause[1]) + a.graceful_timeout < grace <= int(pause[1]) + \
                a.graceful_timeout + 10, (grace, a.graceful_timeout)
        elif a.command in {"encoder", "backbone"}:
            # the drain: the backbone's --drain-timeout (the encoder finishes one batch, well under 30 s)
            drain = getattr(a, "drain_timeout", 30)
            assert grace > max(drain, 30), f"{proc.workload['metadata']['name']}: grace {grace} s <= drain"
            live = c["livenessProbe"]
            probe = live.get("httpGet") or live["tcpSocket"]
            assert _port(c, probe["port"]) == a.metrics_port
            assert live["httpGet"]["path"] == "/live"  # 503 once the loop is stuck (router/metrics.py)
            assert _port(c, c["startupProbe"]["tcpSocket"]["port"]) == a.metrics_port
        elif a.command == "redis":
            assert "readinessProbe" in c and "livenessProbe" in c


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_secrets_come_from_kubernetes_secrets_that_exist_or_are_documented(overlay, monkeypatch):
    docs = RENDERED[overlay]
    defined = {(d["metadata"]["name"], k) for d in docs if d["kind"] == "Secret"
               for k in {**d.get("data", {}), **d.get("stringData", {})}}
    documented = set()
    for command in re.findall(r"create secret generic (\S+)((?:\\\n|[^\n])*)", README.read_text()):
        name, rest = command
        documented |= {(name, key) for key in re.findall(r"--from-(?:literal|file)=([\w.-]+)=", rest)}
    assert documented, "deploy/k8s/README.md shows the `kubectl create secret generic` commands"
    refs = []  # (secret, key, optional)
    for doc in _workloads(docs):
        spec = _pod_spec(doc)
        for volume in spec.get("volumes", []):
            if "secret" in volume:
                items = volume["secret"].get("items")
                assert items, f"{doc['metadata']['name']}: name the secret's keys the pod mounts"
                refs += [(volume["secret"]["secretName"], i["key"], volume["secret"].get("optional", False))
                         for i in items]
        for c in _all_containers(doc):
            assert all("secretRef" not in s for s in c.get("envFrom", [])), "name each key taken from a secret"
            refs += [(v["valueFrom"]["secretKeyRef"]["name"], v["valueFrom"]["secretKeyRef"]["key"],
                      v["valueFrom"]["secretKeyRef"].get("optional", False))
                     for v in c.get("env", []) if "secretKeyRef" in v.get("valueFrom", {})]
            for var in c.get("env", []):
                assert "value" not in var or not re.search(r"PASSWORD|KEY|TOKEN", var["name"]), \
                    f"{var['name']}: a secret as a literal"
    for doc in docs:
        if doc["kind"] == "TriggerAuthentication":
            refs += [(r["name"], r["key"], False) for r in doc["spec"]["secretTargetRef"]]
    assert refs
    for name, key, optional in refs:
        assert (name, key) in defined | documented, f"secret {name} key {key}: neither defined nor in README.md"
    assert ("tributary-redis", "password") in {(n, k) for n, k, optional in refs if not optional}
    # every process that talks to Redis reads the password from the mounted secret, never from a literal
    for proc in _processes(docs, monkeypatch):
        if proc.args.command not in REDIS_CLIENTS:
            continue
        password_file = Path(proc.env["TRIBUTARY_REDIS_PASSWORD_FILE"])
        mounts = {Path(m["mountPath"]): m["name"] for m in proc.container["volumeMounts"]}
        volume = next(v for v in _pod_spec(proc.workload)["volumes"] if v["name"] == mounts[password_file.parent])
        assert volume["secret"]["secretName"] == "tributary-redis"
        assert {"key": "password", "path": password_file.name} in volume["secret"]["items"]
        assert volume["secret"]["defaultMode"] & 0o007 == 0, "not world-readable"
        assert "@" not in proc.env["TRIBUTARY_REDIS_URL"], "the password comes from the file, not the URL"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_disruption_budgets_select_one_workload_each(overlay):
    docs = RENDERED[overlay]
    covered = set()
    for pdb in (d for d in docs if d["kind"] == "PodDisruptionBudget"):
        spec = pdb["spec"]
        assert ("maxUnavailable" in spec) != ("minAvailable" in spec)
        selector = spec["selector"]["matchLabels"]
        matched = [w["metadata"]["name"] for w in _workloads(docs)
                   if _selects(selector, w["spec"]["template"]["metadata"]["labels"])]
        assert len(matched) == 1, f"PDB {pdb['metadata']['name']} selects {matched}"
        covered |= set(matched)
    tiers = {"gateway", "encoder-image", "encoder-audio", "backbone-pipeline" if overlay == "pipeline" else "backbone"}
    assert tiers <= covered
    for service in (d for d in docs if d["kind"] == "Service"):
        matched = [w for w in _workloads(docs)
                   if _selects(service["spec"]["selector"], w["spec"]["template"]["metadata"]["labels"])]
        assert len(matched) == 1, f"Service {service['metadata']['name']} selects {len(matched)} workloads"
        exposed = {v for c in _pod_spec(matched[0])["containers"] for p in c.get("ports", [])
                   for v in (p["containerPort"], p.get("name"))}
        for port in service["spec"]["ports"]:
            assert port.get("targetPort", port["port"]) in exposed
    for workload in _workloads(docs):
        if workload["kind"] != "Job":
            assert _selects(workload["spec"]["selector"]["matchLabels"],
                            workload["spec"]["template"]["metadata"]["labels"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_run_unprivileged_as_the_images_user(overlay, monkeypatch):
    docs = RENDERED[overlay]
    uid = int(re.search(r"useradd[^\n]*--uid (\d+)", (ROOT / "deploy" / "Dockerfile").read_text()).group(1))
    claims = {d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"}
    images = set()
    for doc in _workloads(docs):
        spec = _pod_spec(doc)
        ctx = spec["securityContext"]
        assert (ctx["runAsUser"], ctx["runAsNonRoot"], ctx["fsGroup"]) == (uid, True, uid)
        assert ctx["seccompProfile"] == {"type": "RuntimeDefault"}
        assert spec["automountServiceAccountToken"] is False
        volumes = {v["name"]: v for v in spec["volumes"]}
        for v in volumes.values():
            if "persistentVolumeClaim" in v:
                assert v["persistentVolumeClaim"]["claimName"] in claims
        for c in _all_containers(doc):
            images.add(c["image"])
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
            assert sc["capabilities"] == {"drop": ["ALL"]}
    assert images == {"tributary:latest"}, "one image everywhere, so the kustomization's `images` moves them all"
    for proc in _processes(docs, monkeypatch):
        volumes = {v["name"]: v for v in _pod_spec(proc.workload)["volumes"]}
        mounts = {m["mountPath"]: volumes[m["name"]] for m in proc.container["volumeMounts"]}
        assert "emptyDir" in mounts["/tmp"], "a writable /tmp on a read-only root filesystem"
        for var in ("XDG_CACHE_HOME", "TRITON_CACHE_DIR"):
            assert proc.env[var].startswith("/tmp/")
        model = Path(proc.env["TRIBUTARY_MODEL"])
        if proc.args.command != "redis":
            volume = next(v for p, v in mounts.items() if model.is_relative_to(p))
            assert "persistentVolumeClaim" in volume


def test_kustomization_images_cover_the_one_image():
    kust = yaml.safe_load((OVERLAYS["base"] / "kustomization.yaml").read_text())
    assert [i["name"] for i in kust["images"]] == ["tributary"]


def test_files_are_short_lined_and_documented():
    for path in sorted(K8S.rglob("*")):
        if path.is_file():
            for n, line in enumerate(path.read_text().splitlines(), 1):
                assert len(line) <= 120, f"{path.relative_to(ROOT)}:{n} is {len(line)} characters"
    text = README.read_text()
    for needle in ("kubectl apply -k deploy/k8s/base", "overlays/gpu", "overlays/pipeline", "Redis >= 7",
                   "lagCount", "KEDA", "kubectl -n tributary create secret generic tributary-redis"):
        assert needle in text, f"deploy/k8s/README.md should say {needle!r}"
