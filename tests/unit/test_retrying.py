"""provfw.retrying.call_retrying: the first attempt outside tenacity, the rest exactly as retrying() does them."""

import logging

import pytest

from provfw.retrying import call_retrying


class Flaky:
    """Raises each of ``errors`` in turn, then answers ``"ok"``; counts its calls."""

    def __init__(self, *errors):
        self.errors = list(errors)
        self.calls = 0

    def __call__(self):
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "ok"


def test_a_call_that_succeeds_at_once_is_called_once_and_logs_nothing(caplog):
    func = Flaky()
    with caplog.at_level(logging.DEBUG):
        assert call_retrying("thing", func, KeyError, attempts=3, initial=0.001) == "ok"
    assert func.calls == 1 and caplog.records == []


def test_the_first_failure_is_tenacitys_attempt_one_logged_and_waited_like_the_others(caplog):
    func = Flaky(KeyError("a"), KeyError("b"))
    with caplog.at_level(logging.WARNING, logger="provfw.retrying"):
        assert call_retrying("thing", func, KeyError, attempts=3, initial=0.001) == "ok"
    assert func.calls == 3
    assert [record.getMessage().split(";")[1].split(",")[0].strip() for record in caplog.records] == [
        "attempt 1", "attempt 2"]
    assert "thing failed (KeyError: 'a')" in caplog.records[0].getMessage()


def test_attempts_count_the_first_and_the_last_error_is_raised_unchanged():
    last = KeyError("third")
    func = Flaky(KeyError("first"), KeyError("second"), last, KeyError("never reached"))
    with pytest.raises(KeyError) as raised:
        call_retrying("thing", func, (KeyError, ValueError), attempts=3, initial=0.001)
    assert raised.value is last and func.calls == 3


@pytest.mark.parametrize("failing_at", [1, 2])
def test_an_error_not_worth_retrying_propagates_at_once(failing_at):
    func = Flaky(*([KeyError("retry")] * (failing_at - 1)), RuntimeError("no"))
    with pytest.raises(RuntimeError):
        call_retrying("thing", func, KeyError, attempts=5, initial=0.001)
    assert func.calls == failing_at
