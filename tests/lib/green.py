"""How often another green thread ran while a function ran, as in a worker under eventlet."""

from __future__ import annotations

from typing import Any, Callable


def ticks_during(monkeypatch, func: Callable[[], Any]) -> tuple[Any, int]:
    """Run ``func()`` beside a green thread that counts its turns; return (its result, the turns taken).

    ``provfw.virt.firewall.sets.cooperate`` sleeps with eventlet's ``time`` here, as in a worker (which is
    monkey-patched); a loop that never yields leaves the other green thread 0 turns.
    """
    import eventlet
    import eventlet.green.time

    from provfw.virt.firewall import sets

    monkeypatch.setattr(sets, "time", eventlet.green.time)
    ticks: list[int] = []

    def other_green_thread():
        while True:
            ticks.append(1)
            eventlet.sleep(0)

    other = eventlet.spawn(other_green_thread)
    eventlet.sleep(0)
    try:
        before = len(ticks)
        result = func()
        return result, len(ticks) - before
    finally:
        other.kill()
