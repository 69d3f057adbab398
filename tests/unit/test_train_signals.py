"""StopFlag: signals set a flag (nothing else), the time limit, and restoration of previous handlers."""

from __future__ import annotations

import os
import signal

import pytest

from largessl.run.signals import StopFlag


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2])
def test_signal_sets_flag_once(sig):
    before = signal.getsignal(sig)
    flag = StopFlag().install()
    try:
        assert not flag.agreed()
        os.kill(os.getpid(), sig)
        os.kill(os.getpid(), signal.SIGTERM)  # a second signal keeps the first one's name
        assert flag.local and flag.agreed()
        assert signal.Signals(sig).name in flag.reason
    finally:
        flag.uninstall()
    assert signal.getsignal(sig) == before


def test_time_limit():
    flag = StopFlag(max_minutes=1e-9)
    assert flag.agreed() and "max_minutes" in flag.reason
    assert not StopFlag(max_minutes=0).agreed()
