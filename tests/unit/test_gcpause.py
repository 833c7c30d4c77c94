"""provfw.gcpause: the collector is off inside a pause and as it was found afterwards, however pauses nest."""

from __future__ import annotations

import gc

import pytest

from provfw import gcpause


def test_a_pause_turns_the_collector_off_and_back_on_even_when_the_body_raises():
    assert gc.isenabled()
    with pytest.raises(RuntimeError):
        with gcpause.paused():
            assert not gc.isenabled()
            raise RuntimeError("boom")
    assert gc.isenabled()


def test_nested_pauses_re_enable_only_at_the_outermost():
    with gcpause.paused():
        with gcpause.paused():
            assert not gc.isenabled()
        assert not gc.isenabled()
    assert gc.isenabled()


def test_a_collector_disabled_on_purpose_stays_disabled():
    gc.disable()
    try:
        with gcpause.paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()
