"""Build an offline wheelhouse of the miles-fsdp dependencies a target environment lacks.

Run on a machine with network; copy the folder to the (offline) target and run the
printed install command there. The target is described either by its interpreter
(`--python /path/to/python`, run here to read its version, platform and packages) or by a
`pip freeze` listing (`--installed freeze.txt`, with `--python-version`/`--platform`).

    python tools/wheelhouse.py --python /opt/venv/bin/python --out wheelhouse/
    python tools/wheelhouse.py --installed freeze.txt --python-version 3.12 --out wheelhouse/

Each wheel is fetched with `pip download --no-deps --only-binary=:all:` for the target's
python version and platform; the dependencies a fetched wheel declares (Requires-Dist)
are planned the same way, until nothing the target lacks is left.
"""

import argparse
import json
import re
import subprocess
import sys
import tomllib
import zipfile
from dataclasses import dataclass
from pathlib import Path

try:
    from packaging.requirements import Requirement
    from packaging.version import InvalidVersion, Version
except ImportError:  # pip always carries a copy
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.version import InvalidVersion, Version

ROOT = Path(__file__).resolve().parents[1]
_PROBE = (
    "import json, sys, sysconfig, importlib.metadata as md; "
    "print(json.dumps({'python_version': '%d.%d' % sys.version_info[:2], 'platform': sysconfig.get_platform(), "
    "'installed': {d.metadata['Name']: d.version for d in md.distributions() if d.metadata['Name']}}))"
)


@dataclass
class Target:
    python_version: str  # "3.11"
    platform: str  # sysconfig style, e.g. "linux-x86_64"
    installed: dict[str, str]  # normalised name -> version ("" when unknown)


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_freeze(text: str) -> dict[str, str]:
    """`pip freeze` lines -> {normalised name: version}; `name @ url` entries get version ""."""
    installed = {}
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line or line.startswith("-"):  # blank, comment, -e / -r options
            continue
        if "==" in line:
            name, version = line.split("==", 1)
            installed[normalize(name.strip())] = version.strip()
        elif " @ " in line:
            installed[normalize(line.split(" @ ", 1)[0].strip())] = ""
        else:
            raise ValueError(f"wheelhouse: cannot read installed-package line {raw!r}; expected 'name==version'")
    return installed


def project_requirements(pyproject: Path, extras: list[str]) -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    reqs = list(project.get("dependencies", []))
    optional = project.get("optional-dependencies", {})
    for extra in extras:
        if extra not in optional:
            raise ValueError(f"wheelhouse: extra {extra!r} is not in {pyproject} (known: {sorted(optional)})")
        # self-references such as "miles-fsdp[test]" expand to that extra's list
        for req in optional[extra]:
            r = Requirement(req)
            if normalize(r.name) == normalize(project["name"]):
                reqs += project_requirements(pyproject, sorted(r.extras))
            else:
                reqs.append(req)
    return reqs


def _satisfied(req: Requirement, version: str) -> bool:
    if not version or not req.specifier:
        return True
    try:
        return req.specifier.contains(Version(version), prereleases=True)
    except InvalidVersion:
        return True  # a local build we cannot compare: trust what is installed


def plan(requirements: list[str], target: Target, already: set[str] = frozenset()) -> list[Requirement]:
    """Requirements the target lacks (missing, or installed at a version outside the specifier).

    Markers are evaluated for the target's python and platform; names in `already` (fetched
    earlier) are skipped; a name listed twice is planned once with both specifiers.
    """
    env = {"python_version": target.python_version, "python_full_version": target.python_version + ".0",
           "sys_platform": "linux" if target.platform.startswith("linux") else sys.platform, "extra": ""}
    wanted: dict[str, Requirement] = {}
    for text in requirements:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate(env):
            continue
        name = normalize(req.name)
        if name in already:
            continue
        if name in target.installed and _satisfied(req, target.installed[name]):
            continue
        if name in wanted:
            wanted[name].specifier &= req.specifier
        else:
            wanted[name] = req
    return list(wanted.values())


def pip_platforms(platform: str) -> list[str]:
    """sysconfig platform -> pip --platform tags (manylinux flavours for linux)."""
    if platform.startswith("linux-"):
        arch = platform.split("-", 1)[1]
        return [f"manylinux_2_28_{arch}", f"manylinux2014_{arch}", f"linux_{arch}"]
    return [re.sub(r"[-.]", "_", platform)]


def download_cmd(req: Requirement, dest: Path, target: Target) -> list[str]:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--python-version", target.python_version, "--dest", str(dest)]
    for tag in pip_platforms(target.platform):
        cmd += ["--platform", tag]
    name = req.name + (f"[{','.join(sorted(req.extras))}]" if req.extras else "")
    return cmd + [f"{name}{req.specifier}"]


def wheel_requires(wheel: Path) -> list[str]:
    """Requires-Dist entries of a wheel (extras-only ones drop out later via their marker)."""
    with zipfile.ZipFile(wheel) as zf:
        meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        text = zf.read(meta).decode()
    return [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Requires-Dist:")]


def probe(python: str) -> Target:
    out = subprocess.run([python, "-c", _PROBE], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"wheelhouse: could not run --python {python}: {out.stderr.strip()}")
    info = json.loads(out.stdout)
    return Target(info["python_version"], info["platform"], {normalize(k): v for k, v in info["installed"].items()})


def build(target: Target, requirements: list[str], dest: Path) -> list[str]:
    dest.mkdir(parents=True, exist_ok=True)
    fetched: set[str] = set()
    todo = plan(requirements, target)
    while todo:
        new_reqs = []
        for req in todo:
            before = set(dest.glob("*.whl"))
            subprocess.run(download_cmd(req, dest, target), check=True)
            fetched.add(normalize(req.name))
            for wheel in set(dest.glob("*.whl")) - before:
                new_reqs += wheel_requires(wheel)
        todo = plan(new_reqs, target, already=fetched)
    return sorted(fetched)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--python", help="target interpreter to inspect (run here)")
    ap.add_argument("--installed", type=Path, help="target's `pip freeze` output, instead of --python")
    ap.add_argument("--python-version", default="%d.%d" % sys.version_info[:2], help="with --installed")
    ap.add_argument("--platform", default="linux-x86_64", help="with --installed (sysconfig style)")
    ap.add_argument("--extras", default="", help="comma list of pyproject extras, e.g. test,triton")
    ap.add_argument("--out", type=Path, default=Path("wheelhouse"))
    args = ap.parse_args()
    if bool(args.python) == bool(args.installed):
        ap.error("give exactly one of --python or --installed")
    if args.python:
        target = probe(args.python)
    else:
        target = Target(args.python_version, args.platform, parse_freeze(args.installed.read_text()))
    reqs = project_requirements(ROOT / "pyproject.toml", [e for e in args.extras.split(",") if e])
    names = build(target, reqs, args.out)
    if not names:
        print("wheelhouse: the target already has every dependency")
        return
    print(f"wheelhouse: {len(names)} packages in {args.out}; on the target run:")
    print(f"  python -m pip install --no-index --find-links {args.out} {' '.join(names)}")


if __name__ == "__main__":
    main()
