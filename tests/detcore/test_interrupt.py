"""`detcore.interrupt`: SIGINT / SIGTERM become a stop request, a second one stops at once, handlers come back."""

import os
import signal

import pytest

from detcore.interrupt import Interrupted, StopRequest, exit_code_for


def test_the_first_signal_is_recorded_the_second_raises_and_the_handlers_come_back():
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with StopRequest() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signum == signal.SIGTERM
        with pytest.raises(Interrupted) as second:
            os.kill(os.getpid(), signal.SIGINT)
        assert second.value.exit_code == 130
        with pytest.raises(Interrupted, match="SIGTERM") as raised:
            stop.raise_if_requested("kept")
        assert (raised.value.exit_code, raised.value.message) == (143, "kept")
    assert {s: signal.getsignal(s) for s in before} == before


def test_raise_at_once_and_exit_codes(capsys):
    with pytest.raises(Interrupted) as raised, StopRequest(raise_at_once=True):
        os.kill(os.getpid(), signal.SIGINT)
    assert isinstance(raised.value, KeyboardInterrupt) and raised.value.report() == 130
    assert "interrupted by SIGINT: re-run the same command to resume" in capsys.readouterr().err
    assert (exit_code_for(signal.SIGINT), exit_code_for(signal.SIGTERM)) == (130, 143)
