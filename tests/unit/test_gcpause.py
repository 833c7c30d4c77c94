"""provfw.gcpause: the collector is off inside a pause and as it was found afterwards, however pauses nest;
what a ``kept`` pause built is frozen (a worker's snapshot)."""

from __future__ import annotations

import gc
import json
import weakref
import zlib

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


class Kept:
    """A tracked object that a weak reference can watch."""

    def __init__(self, value):
        self.value = value


@pytest.fixture
def unfrozen():
    """Leave the process' collector as the test found it: nothing frozen."""
    gc.unfreeze()
    yield
    gc.unfreeze()


def test_what_a_kept_body_built_is_frozen_and_still_freed_by_reference_counting(unfrozen):
    with gcpause.kept():
        assert not gc.isenabled()
        built = [Kept(index) for index in range(10_000)]
    assert gc.isenabled()
    assert gc.get_freeze_count() >= len(built)
    assert gc.get_count()[0] < 700        # nothing left young for the next collections to scan
    watch = weakref.ref(built[0])
    del built                             # the next snapshot replaces them: no collection needed
    assert watch() is None


def test_kept_inside_another_pause_is_a_plain_pause(unfrozen):
    with gcpause.paused():
        with gcpause.kept():
            [Kept(index) for index in range(1000)]
        assert not gc.isenabled()
    assert gc.isenabled() and gc.get_freeze_count() == 0


def _reply(payload) -> bytes:
    return zlib.compress(json.dumps(payload).encode())


class RawClient:
    """The conductor's side of one ``get_provider_fw_rules``: answers ``body`` as the broker delivered it."""

    def __init__(self, body: bytes):
        self.body = body

    def call_raw(self, method, **args):
        assert method == "get_provider_fw_rules"
        return self.body, {}


@pytest.mark.parametrize("rules, frozen", [(20_000, True), (10, False)], ids=["snapshot", "small"])
def test_a_worker_decodes_a_large_reply_under_kept_and_a_small_one_as_any_object(unfrozen, rules, frozen):
    from provfw.conductor import api as conductor_api

    body = _reply({"kind": "snapshot", "generation": 7,
                   "rules": [[index + 1, f"10.{index // 65536}.{index // 256 % 256}.{index % 256}/32", "all", -1,
                              -1, None] for index in range(rules)]})
    assert (len(body) > conductor_api.KEEP_ABOVE_BYTES) is frozen
    snapshot = conductor_api.ConductorAPI(host="hv1", client=RawClient(body)).get_provider_fw_rules(None)
    assert snapshot.generation == 7 and len(snapshot.rules) == rules
    assert snapshot.rules[-1].spec.cidr.endswith("/32") and gc.isenabled()
    assert (gc.get_freeze_count() >= rules) is frozen


class _Cycle:
    """Garbage only the collector can free: it refers to itself (as a caught exception and its traceback do)."""

    def __init__(self):
        self.me = self


def test_garbage_cycles_made_between_snapshots_are_not_frozen_for_ever(unfrozen):
    """A worker running for weeks applies many snapshots; each ``kept`` must not leak the cycles made before it.

    gc.freeze() moves every tracked object to the permanent generation, garbage cycles too, and no
    collection looks at them again; only reference counting frees frozen objects, and a cycle never
    reaches zero.  So a snapshot applied after 500 cycles became garbage must leave none of them frozen.
    """
    frozen = []
    for _ in range(20):
        garbage = [weakref.ref(_Cycle()) for _ in range(500)]      # the time between two snapshots
        with gcpause.kept():
            snapshot = [Kept(index) for index in range(5_000)]    # the next snapshot replaces the last
        assert sum(ref() is not None for ref in garbage) == 0, "garbage cycles were frozen"
        frozen.append(gc.get_freeze_count())
    del snapshot
    # The first freeze takes the whole process (pytest's modules too); later ones only replace the snapshot.
    assert max(frozen[1:]) - min(frozen[1:]) < 500, frozen
