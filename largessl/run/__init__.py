"""A run's machinery, one floor below ``train/`` and ``eval/``, which both stand on it.

How a run saves and resumes (:mod:`~largessl.run.checkpoint`, :mod:`~largessl.run.rng`), stops on a signal
(:mod:`~largessl.run.signals`), reports (:mod:`~largessl.run.sinks`, :mod:`~largessl.run.progress`), picks its
device and precision (:mod:`~largessl.run.precision`), lays out its directory (:mod:`~largessl.run.layout`),
writes files durably (:mod:`~largessl.run.durable`) and ends (:mod:`~largessl.run.exit_codes`).
Nothing here knows a method, an optimizer or an evaluation protocol.
"""
