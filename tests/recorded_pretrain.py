"""``python tests/recorded_pretrain.py key=value ...``: ``largessl pretrain`` (the real CLI, shard stream and
trainer) in this process, with the probes of :mod:`run_probes` on the stream the trainer builds.

The probe wraps whatever ``largessl.data.stream.build_train_stream`` returns; every attribute other than
``iterate`` passes through, so the trainer sees the real stream's resume interface unchanged.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run_probes  # noqa: E402


def main(argv: list[str]) -> int:
    """Run the pretrain CLI with ``argv`` as overrides; returns its exit code."""
    probes = run_probes.install()
    import largessl.data.stream as stream_mod
    from largessl import cli

    build = stream_mod.build_train_stream

    def recorded_build(*args, **kwargs):
        return probes.wrap(build(*args, **kwargs))

    stream_mod.build_train_stream = recorded_build
    code = 1
    try:
        code = cli.main(["pretrain", *argv])
        return code
    finally:
        probes.finish(code)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
