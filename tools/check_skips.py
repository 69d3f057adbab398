"""``python tools/check_skips.py REPORT``: fail (exit 1) when pytest skipped any test outside tests/gpu/.

REPORT is the JSON-lines file that tests/conftest.py writes when ``LARGESSL_SKIP_REPORT`` is set: a header
line from a finished session, then one line per skip. ``.ci/run`` runs this after the suite, so a machine
without SLURM, Chromium, SeaweedFS or DeepSpeed is a red build, not a silent pass. A missing or headerless
report fails too (the hook did not run, or pytest died before the end).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ALLOWED_PREFIX = "tests/gpu/"


def unexpected_skips(report: Path) -> list[dict[str, str]]:
    """The skips outside tests/gpu/ listed in ``report`` (raises RuntimeError when it is not a full report)."""
    if not report.is_file():
        raise RuntimeError(f"no skip report at {report}: tests/conftest.py did not write it (pytest did not "
                           "finish, or LARGESSL_SKIP_REPORT did not reach it)")
    lines = [json.loads(line) for line in report.read_text().splitlines() if line.strip()]
    if not lines or lines[0].get("session") != "complete":
        raise RuntimeError(f"skip report {report} has no header from a finished pytest session")
    return [s for s in lines[1:] if not s["nodeid"].startswith(ALLOWED_PREFIX)]


def main(argv: list[str]) -> int:
    """Print every unexpected skip with its reason; 0 when there is none."""
    if len(argv) != 1:
        print(__doc__.strip().splitlines()[0], file=sys.stderr)
        return 2
    try:
        bad = unexpected_skips(Path(argv[0]))
    except (RuntimeError, ValueError, KeyError) as e:
        print(f"check_skips: {e}", file=sys.stderr)
        return 1
    if not bad:
        print("check_skips: no test skipped outside tests/gpu/")
        return 0
    print(f"check_skips: {len(bad)} test(s) skipped outside tests/gpu/; CI needs every one of them to run:",
          file=sys.stderr)
    for s in bad:
        print(f"  SKIPPED {s['nodeid']}: {s['reason']}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
