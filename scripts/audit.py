"""Audits the pinned dependencies in requirements/*.lock for known vulnerabilities.

Two sources:

* online (default): pip-audit (installed from requirements/audit.lock into .venv-audit by scripts/audit.sh), which
  asks PyPI's vulnerability API about every pinned version;
* offline (``--advisories DIR``): a checkout of an OSV-format advisory database such as
  https://github.com/pypa/advisory-database, for machines that cannot reach the API.

Known vulnerabilities that were reviewed and judged not to apply are listed in requirements/audit-ignore.txt, one
id per line with the reason after a ``#``. pip-audit reports "No known vulnerabilities found" even when it could not
ask about a single package (the API unreachable): this script counts what was really audited and says UNVERIFIED
(exit 3) when that is nothing, so an unreachable service never reads as a clean audit.

Exit status: 0 clean, 1 vulnerabilities found (not ignored), 2 usage error, 3 nothing could be audited.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

ROOT = Path(__file__).resolve().parent.parent
LOCKS = ("cpu", "gpu", "dev")
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==([^\s;\\]+)")


@dataclass(frozen=True)
class Finding:
    package: str
    version: str
    vuln: str
    fixed: str
    lock: str


def pins(lock: Path) -> dict[str, str]:
    """Every ``name==version`` pin in a lock file (all markers: a pin for any platform is audited)."""
    found: dict[str, str] = {}
    for line in lock.read_text().splitlines():
        m = _PIN.match(line)
        if m:
            found[f"{canonicalize_name(m.group(1))}=={m.group(2)}"] = m.group(2)
    return found


def ignored(path: Path) -> dict[str, str]:
    """id -> reason from the reviewed ignore file; an entry without a reason is refused."""
    out: dict[str, str] = {}
    if not path.exists():
        return out
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        vid, _, reason = line.partition("#")
        if not reason.strip():
            raise SystemExit(f"{path}:{n}: '{vid.strip()}' has no reason (write it after a '#')")
        out[vid.strip()] = reason.strip()
    return out


# --------------------------------------------------------------------------------------------------- offline (OSV)

def _load_advisory(path: Path) -> dict | None:
    text = path.read_text(errors="replace")
    if path.suffix == ".json":
        return json.loads(text)
    import yaml  # PyYAML: a dependency of transformers, so in every lock

    return yaml.safe_load(text)


def _in_range(v: Version, events: list[dict]) -> bool:
    """OSV ECOSYSTEM range semantics: introduced opens an interval, fixed closes it (exclusive), last_affected
    closes it (inclusive)."""
    def key(e):
        val = next(iter(e.values()))
        return Version("0") if val == "0" else Version(val)

    affected = False
    try:
        for e in sorted(events, key=key):
            if "introduced" in e and v >= key(e):
                affected = True
            elif "fixed" in e and v >= key(e):
                affected = False
            elif "last_affected" in e and v > key(e):
                affected = False
    except InvalidVersion:
        return False
    return affected


def _fixed_in(events: list[dict]) -> str:
    return ",".join(str(e["fixed"]) for e in events if "fixed" in e)


def audit_offline(advisories: Path, locks: dict[str, dict[str, str]]) -> tuple[list[Finding], int]:
    wanted: dict[str, set[str]] = {}
    for pinned in locks.values():
        for pin in pinned:
            name, _, version = pin.partition("==")
            wanted.setdefault(name, set()).add(version)
    files = [p for p in advisories.rglob("*") if p.suffix in (".yaml", ".yml", ".json") and p.is_file()]
    if not files:
        raise SystemExit(f"{advisories}: no OSV advisories (*.yaml, *.json) found")
    findings: list[Finding] = []
    for path in files:
        try:
            adv = _load_advisory(path)
        except Exception:  # a malformed advisory file is skipped, not fatal
            continue
        if not isinstance(adv, dict) or adv.get("withdrawn"):
            continue
        for aff in adv.get("affected") or []:
            pkg = aff.get("package") or {}
            if pkg.get("ecosystem") != "PyPI":
                continue
            name = canonicalize_name(pkg.get("name", ""))
            for version in wanted.get(name, ()):
                v = Version(version)
                hit = version in (aff.get("versions") or [])
                fixed = ""
                for r in aff.get("ranges") or []:
                    if r.get("type") == "ECOSYSTEM" and _in_range(v, r.get("events") or []):
                        hit, fixed = True, _fixed_in(r.get("events") or [])
                if hit:
                    ids = [adv["id"], *(adv.get("aliases") or [])]
                    for lock, pinned in locks.items():
                        if f"{name}=={version}" in pinned:
                            findings.append(Finding(name, version, ",".join(ids), fixed, lock))
    return findings, sum(len(p) for p in locks.values())


# ------------------------------------------------------------------------------------------------ online (pip-audit)

def audit_online(pip_audit: str, lock_files: dict[str, Path]) -> tuple[list[Finding], int]:
    findings: list[Finding] = []
    audited = 0
    for lock, path in lock_files.items():
        proc = subprocess.run(
            [pip_audit, "-r", str(path), "--require-hashes", "--disable-pip", "--progress-spinner", "off",
             "-f", "json"], capture_output=True, text=True, timeout=900)
        try:
            report = json.loads(proc.stdout)
        except json.JSONDecodeError:
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            print(f"  {lock}: pip-audit did not answer ({tail[:200]})", file=sys.stderr)
            continue
        for dep in report.get("dependencies", []):
            if "skip_reason" in dep:
                continue
            audited += 1
            for vuln in dep.get("vulns", []):
                ids = [vuln["id"], *(vuln.get("aliases") or [])]
                findings.append(Finding(dep["name"], dep["version"], ",".join(ids),
                                        ",".join(vuln.get("fix_versions") or []), lock))
    return findings, audited


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--advisories", type=Path, help="an OSV-format advisory database checkout (offline audit)")
    ap.add_argument("--pip-audit", default=str(ROOT / ".venv-audit" / "bin" / "pip-audit"))
    ap.add_argument("--ignore-file", type=Path, default=ROOT / "requirements" / "audit-ignore.txt")
    ap.add_argument("--locks", nargs="*", default=list(LOCKS))
    args = ap.parse_args(argv)

    lock_files = {name: ROOT / "requirements" / f"{name}.lock" for name in args.locks}
    missing = [str(p) for p in lock_files.values() if not p.exists()]
    if missing:
        print(f"missing lock files: {', '.join(missing)}", file=sys.stderr)
        return 2
    skip = ignored(args.ignore_file)
    if args.advisories:
        findings, audited = audit_offline(args.advisories, {n: pins(p) for n, p in lock_files.items()})
        source = f"advisories in {args.advisories}"
    else:
        findings, audited = audit_online(args.pip_audit, lock_files)
        source = "PyPI's vulnerability API (pip-audit)"
    total = sum(len(pins(p)) for p in lock_files.values())
    if audited == 0:
        print(f"audit UNVERIFIED: not one of the {total} pins could be checked against {source} "
              "(service unreachable?). Run it where the API answers, or pass --advisories.", file=sys.stderr)
        return 3
    open_findings = sorted({f for f in findings if not any(i in skip for i in f.vuln.split(","))},
                           key=lambda f: (f.package, f.vuln))
    quiet = len(findings) - len([f for f in findings if f in open_findings])
    print(f"audited {audited} of {total} pins ({', '.join(args.locks)}) against {source}: "
          f"{len(open_findings)} open, {quiet} reviewed and ignored")
    for f in open_findings:
        print(f"  {f.package}=={f.version} [{f.lock}] {f.vuln} fixed in: {f.fixed or 'no fix yet'}")
    return 1 if open_findings else 0


if __name__ == "__main__":
    sys.exit(main())
