#!/usr/bin/env python3
"""The image is what CI tests: docker/Dockerfile installs from constraints.txt, the file the Makefile (and so CI)
installs with, and nothing in the Dockerfile pins another version.

    python tools/check_docker_pins.py                  # static: the Dockerfile against constraints.txt (CI runs it)
    python tools/check_docker_pins.py --installed      # inside the image build: installed versions == the pins

Static checks: constraints.txt is copied into the image; every ``pip install`` uses ``-c constraints.txt``; a
``name==version`` written in the Dockerfile equals the constraint of that name; the base image brings no torch of
its own (a ``pytorch/*`` or NGC PyTorch base would carry another version than the pinned one). Exit 1 naming each
difference.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TORCH_BASES = ("pytorch/pytorch", "nvcr.io/nvidia/pytorch")


def read_pins(path: Path) -> dict[str, str]:
    """``name==version`` lines of a constraints file, names normalised (PEP 503)."""
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        m = re.fullmatch(r"([A-Za-z0-9_.\-]+)\s*==\s*([^\s;]+)", line)
        if m:
            pins[re.sub(r"[-_.]+", "-", m.group(1)).lower()] = m.group(2)
    return pins


def _instructions(text: str) -> list[str]:
    """Dockerfile instructions with their continuation lines joined, comments dropped."""
    out, cur = [], ""
    for line in text.splitlines():
        if line.lstrip().startswith("#") and not cur:
            continue
        cur += line.rstrip("\\").strip() + " "
        if not line.rstrip().endswith("\\"):
            out.append(cur.strip())
            cur = ""
    return [i for i in out if i]


def check_dockerfile(dockerfile: Path, constraints: Path) -> list[str]:
    """Every way the Dockerfile departs from constraints.txt."""
    pins = read_pins(constraints)
    problems = []
    instructions = _instructions(dockerfile.read_text())
    args = {m.group(1): m.group(2) for i in instructions if (m := re.match(r"ARG\s+(\w+)=(\S+)", i))}
    for i in instructions:
        if i.startswith("FROM"):
            image = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), i.split()[1])
            if image.startswith(TORCH_BASES):
                problems.append(f"the base image {image} brings its own torch; build on a plain Python image and "
                                f"install torch=={pins.get('torch', '?')} from constraints.txt")
    if not any(re.match(r"COPY\s+.*\bconstraints\.txt\b", i) for i in instructions):
        problems.append("constraints.txt is not copied into the image")
    for i in instructions:
        for cmd in re.split(r"&&|;", i):
            if re.search(r"\bpip3?\s+install\b", cmd) and "-r " not in cmd:
                if not re.search(r"(-c|--constraint)[ =]\S*constraints\.txt", cmd):
                    problems.append(f"a pip install without -c constraints.txt: {cmd.strip()}")
            for name, version in re.findall(r"([A-Za-z0-9_.\-]+)==([0-9][^\s\"'\]]*)", cmd):
                key = re.sub(r"[-_.]+", "-", name).lower()
                if key in pins and pins[key] != version:
                    problems.append(f"{name}=={version} in the Dockerfile, constraints.txt pins {pins[key]}")
    if not pins:
        problems.append(f"{constraints} pins nothing")
    return problems


def check_installed(constraints: Path) -> list[str]:
    """Installed distributions against the pins (a local version suffix such as +cu128 is ignored)."""
    from importlib.metadata import PackageNotFoundError, version

    problems = []
    for name, pinned in read_pins(constraints).items():
        try:
            have = version(name)
        except PackageNotFoundError:
            problems.append(f"{name} is not installed (constraints.txt pins {pinned})")
            continue
        if have.split("+", 1)[0] != pinned:
            problems.append(f"{name} {have} is installed, constraints.txt pins {pinned}")
    return problems


def main(argv: list[str]) -> int:
    """Entry point."""
    constraints = ROOT / "constraints.txt"
    if "--installed" in argv:
        constraints = Path(argv[argv.index("--installed") + 1]) if len(argv) > argv.index("--installed") + 1 \
            else Path("constraints.txt")
        problems = check_installed(constraints)
    else:
        problems = check_dockerfile(ROOT / "docker" / "Dockerfile", constraints)
    for p in problems:
        print(f"docker pins: {p}", file=sys.stderr)
    if not problems:
        print("docker pins: ok (the image installs constraints.txt's versions)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
