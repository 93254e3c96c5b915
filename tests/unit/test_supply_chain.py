"""Supply chain: the hashed locks cover pyproject.toml, the audit reads advisories correctly, no unsafe
deserializer is reachable from product code."""
from __future__ import annotations

import importlib.util
import re
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
PRODUCT = ("gateway", "encoders", "backbone", "router", "cache", "models", "tributary")


def _audit():
    spec = importlib.util.spec_from_file_location("tributary_audit", ROOT / "scripts" / "audit.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses resolve the module by name
    spec.loader.exec_module(mod)
    return mod


def _requirements(extra: str) -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    for r in project["optional-dependencies"][extra]:
        req = Requirement(r)
        if canonicalize_name(req.name) == "tributary":
            reqs += _requirements(next(iter(req.extras)))
        else:
            reqs.append(req)
    return reqs


@pytest.mark.parametrize("extra", ["cpu", "gpu", "dev"])
def test_lock_pins_every_requirement_within_its_specifier(extra):
    lock = ROOT / "requirements" / f"{extra}.lock"
    pins: dict[str, list[str]] = {}
    for name_version in _audit().pins(lock):
        name, _, version = name_version.partition("==")
        pins.setdefault(name, []).append(version)
    env = default_environment()
    for req in _requirements(extra):
        if req.marker and not req.marker.evaluate(env):
            continue
        versions = pins.get(canonicalize_name(req.name))
        assert versions, f"{req.name} is in pyproject.toml [{extra}] but not in {lock.name}: run scripts/lock.sh"
        assert any(req.specifier.contains(v, prereleases=True) for v in versions), (
            f"{lock.name} pins {req.name}=={versions} outside {req.specifier}: run scripts/lock.sh")


@pytest.mark.parametrize("extra", ["cpu", "gpu", "dev", "audit"])
def test_every_pin_carries_a_hash(extra):
    text = (ROOT / "requirements" / f"{extra}.lock").read_text()
    blocks = re.split(r"\n(?=[A-Za-z0-9])", text)
    pinned = [b for b in blocks if "==" in b.splitlines()[0]]
    assert pinned
    for block in pinned:
        assert "--hash=sha256:" in block, block.splitlines()[0]


def test_cpu_and_gpu_locks_never_hold_both_onnxruntimes():
    audit = _audit()
    cpu = {p.partition("==")[0] for p in audit.pins(ROOT / "requirements" / "cpu.lock")}
    gpu = {p.partition("==")[0] for p in audit.pins(ROOT / "requirements" / "gpu.lock")}
    assert "onnxruntime" in cpu and "onnxruntime-gpu" not in cpu
    assert "onnxruntime-gpu" in gpu and "onnxruntime" not in gpu


_ADVISORY = """\
id: PYSEC-TEST-1
aliases: [CVE-TEST-1]
affected:
- package: {{name: Starlette, ecosystem: PyPI}}
  ranges:
  - type: GIT
    events: [{{introduced: "0"}}, {{fixed: abc123}}]
  - type: ECOSYSTEM
    events: [{{introduced: "0"}}, {{fixed: "0.25.0"}}, {{introduced: "0.30.0"}}, {{last_affected: "0.31.2"}}]
  versions: ["0.1.0"]
{withdrawn}
"""


@pytest.mark.parametrize(("version", "hit"), [
    ("0.1.0", True), ("0.24.9", True), ("0.25.0", False), ("0.29.1", False),
    ("0.30.0", True), ("0.31.2", True), ("0.31.3", False),
])
def test_offline_audit_reads_osv_ranges(tmp_path, version, hit):
    (tmp_path / "PYSEC-TEST-1.yaml").write_text(_ADVISORY.format(withdrawn=""))
    findings, audited = _audit().audit_offline(tmp_path, {"cpu": {f"starlette=={version}": version}})
    assert audited == 1
    assert [f.vuln for f in findings] == (["PYSEC-TEST-1,CVE-TEST-1"] if hit else [])


def test_offline_audit_skips_withdrawn_advisories(tmp_path):
    (tmp_path / "a.yaml").write_text(_ADVISORY.format(withdrawn="withdrawn: '2024-01-01T00:00:00Z'"))
    findings, _ = _audit().audit_offline(tmp_path, {"cpu": {"starlette==0.1.0": "0.1.0"}})
    assert findings == []


def test_ignore_entries_need_a_reason(tmp_path):
    audit = _audit()
    good = tmp_path / "good.txt"
    good.write_text("# header\nPYSEC-1  # only reachable through a CLI we do not ship (reviewed 2026-12-04)\n")
    assert audit.ignored(good) == {"PYSEC-1": "only reachable through a CLI we do not ship (reviewed 2026-12-04)"}
    bad = tmp_path / "bad.txt"
    bad.write_text("PYSEC-2\n")
    with pytest.raises(SystemExit, match="no reason"):
        audit.ignored(bad)


def test_reviewed_ignore_file_is_well_formed():
    _audit().ignored(ROOT / "requirements" / "audit-ignore.txt")


_UNSAFE = re.compile(
    r"^\s*(import pickle|from pickle|import marshal|import shelve|import dill|import cloudpickle)"
    r"|pickle\.loads?\(|torch\.load\(|marshal\.loads?\(|yaml\.load\(|yaml\.unsafe_load|allow_pickle\s*=\s*True"
    r"|weights_only\s*=\s*False",
    re.M)


def test_no_unsafe_deserializer_in_product_code():
    offenders = []
    for pkg in PRODUCT:
        for path in (ROOT / pkg).rglob("*.py"):
            for m in _UNSAFE.finditer(path.read_text()):
                offenders.append(f"{path.relative_to(ROOT)}: {m.group(0).strip()}")
    assert offenders == [], "tensors travel as safetensors and messages as msgspec structs, never pickle"
