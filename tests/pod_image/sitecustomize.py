"""The test's stand-in for the container image: with this folder on ``PYTHONPATH``, every Python process of a pod
(the ``largessl pretrain`` of a one-process pod, or ``largessl launch node`` and each rank it starts) gets the
probes of :mod:`run_probes` on the trainer's stream, without changing the command the manifest gives the pod.

Only when ``LARGESSL_TEST_RECORD_DIR`` or ``LARGESSL_TEST_GATES`` is set: an import hook wraps
``largessl.data.stream.build_train_stream`` right after that module loads (processes that never build a stream,
like the node launcher, import nothing extra).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
from pathlib import Path
from types import ModuleType

STREAM_MODULE = "largessl.data.stream"


class _WrapStream(importlib.abc.MetaPathFinder):
    """Finds ``largessl.data.stream`` through the normal path finder and patches it once it has executed."""

    def find_spec(self, name: str, path, target=None):  # noqa: ANN001 (importlib's signature)
        if name != STREAM_MODULE:
            return None
        sys.meta_path.remove(self)  # once
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_wrap(module: ModuleType) -> None:
            exec_module(module)
            sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: run_probes
            import run_probes

            probes = run_probes.install()
            build = module.build_train_stream

            def recorded_build(*args, **kwargs):
                return probes.wrap(build(*args, **kwargs))

            module.build_train_stream = recorded_build

        spec.loader.exec_module = exec_and_wrap  # type: ignore[method-assign]
        return spec


if os.environ.get("LARGESSL_TEST_RECORD_DIR") or os.environ.get("LARGESSL_TEST_GATES"):
    sys.meta_path.insert(0, _WrapStream())
