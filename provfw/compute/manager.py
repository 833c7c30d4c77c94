"""ComputeManager: what a compute worker does when told (or when it notices)
that provider rules changed.

Design: the database is the truth and casts are hints.  The manager applies
the current rules at start, on every ``trigger_provider_fw_rules`` cast whose
generation it has not applied yet, and from ``periodic_check`` whenever the
database generation differs from the applied one; otherwise the periodic
check asks the driver to repair drift.  Every outcome - success, a driver
that does not implement the call, a database or kernel failure - is written
to this host's Service row instead of crashing the worker; a failed apply
leaves the previous rules in force.

Thread-safety: methods may be called from the consumer, the periodic loop and
the expiry loop concurrently; the driver serialises the applies.
"""

from __future__ import annotations

import datetime
import logging
import threading
import time

from oslo_config import cfg

from provfw import conf as provfw_conf
from provfw.db import api as db
from provfw.virt import driver as virt_driver
from provfw.virt import firewall

LOG = logging.getLogger(__name__)

DRIFT_CHECK_SPACING = 10

# Casts the consumer may dispatch; anything else is logged and dropped.
RPC_METHODS = frozenset({"trigger_provider_fw_rules"})


class ComputeManager:
    def __init__(self, conf: cfg.ConfigOpts = provfw_conf.CONF, driver: virt_driver.ComputeDriver | None = None,
                 host: str | None = None):
        self.conf = conf
        self.host = host or conf.compute.host
        self.driver = driver or virt_driver.load_compute_driver(conf)
        self.last_result: firewall.ApplyResult | None = None
        self.last_error: str | None = None
        self._state_lock = threading.Lock()
        self._next_drift_check = 0.0

    # ----------------------------------------------------------------- RPC

    def dispatch(self, method: str, args: dict) -> None:
        """Entry point of the cast consumer."""
        if method not in RPC_METHODS:
            LOG.error("ignoring unknown cast %r", method)
            return
        getattr(self, method)(**args)

    def trigger_provider_fw_rules(self, generation: int | None = None) -> firewall.ApplyResult | None:
        """Seed API: rules changed.  ``generation`` lets a worker skip casts it has already applied."""
        applied = self.applied_generation
        if generation is not None and applied is not None and generation <= applied:
            LOG.debug("cast for generation %s ignored: %s already applied", generation, applied)
            return None
        return self.refresh()

    # ----------------------------------------------------------------- work

    @property
    def applied_generation(self) -> int | None:
        return self.last_result.generation if self.last_result else None

    def init_host(self) -> firewall.ApplyResult | None:
        """Called once at start: prepare the host, then apply everything before serving casts."""
        self.driver.init_host()
        return self.refresh(full=True)

    def refresh(self, full: bool = False) -> firewall.ApplyResult | None:
        try:
            result = self.driver.refresh_provider_fw_rules(full=full)
        except NotImplementedError as exc:
            self._record_error(f"{type(self.driver).__name__}.refresh_provider_fw_rules is not implemented: {exc}")
            return None
        except Exception as exc:  # noqa: BLE001 - record, keep running, keep the old rules in force
            LOG.exception("refresh_provider_fw_rules failed; the previously applied rules stay in force")
            self._record_error(f"{type(exc).__name__}: {exc}")
            return None
        self._record_success(result)
        return result

    def periodic_check(self) -> None:
        """Converge on the database generation; if already there, repair kernel drift."""
        try:
            generation = db.provider_fw_generation_get()
        except Exception as exc:  # noqa: BLE001 - database down: keep enforcing what we have
            LOG.warning("periodic check: database unreachable (%s); keeping generation %s",
                        exc, self.applied_generation)
            return
        if self.applied_generation is None or generation != self.applied_generation or self.last_error:
            self.refresh(full=self.applied_generation is None)
            return
        if time.monotonic() < self._next_drift_check:
            return
        started = time.monotonic()
        try:
            if self.driver.repair_provider_fw_drift():
                self._record_success(self.last_result, note="repaired drift")
        except NotImplementedError:
            pass
        except Exception as exc:  # noqa: BLE001
            LOG.exception("drift check failed")
            self._record_error(f"drift check: {type(exc).__name__}: {exc}")
        # Reading the kernel back is cheap for sets but takes seconds for a
        # 100k-rule linear chain (iptables-nft's save); spacing the checks by
        # DRIFT_CHECK_SPACING times their cost keeps them under ~10% of a core.
        self._next_drift_check = time.monotonic() + DRIFT_CHECK_SPACING * (time.monotonic() - started)

    def expire_rules(self) -> None:
        try:
            result = self.driver.expire_provider_fw_rules()
        except Exception as exc:  # noqa: BLE001
            LOG.exception("expiring rules failed")
            self._record_error(f"expiry: {type(exc).__name__}: {exc}")
            return
        if result is not None:
            with self._state_lock:
                self.last_result = result
            self._write_service(rule_count=result.rule_count)

    def next_expiry(self) -> datetime.datetime | None:
        try:
            return self.driver.next_provider_fw_expiry()
        except Exception:  # noqa: BLE001
            return None

    def heartbeat(self) -> None:
        self._write_service(heartbeat=True)

    # ----------------------------------------------------------------- service row

    def _record_success(self, result: firewall.ApplyResult | None, note: str = "") -> None:
        if result is None:
            return
        with self._state_lock:
            self.last_result = result
            self.last_error = None
        if result.changed or note:
            LOG.info("applied generation %s: %d rules, %s in %.3fs %s", result.generation, result.rule_count,
                     result.mode, result.seconds, note)
        self._write_service(applied_generation=result.generation, rule_count=result.rule_count,
                            applied_at=datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None),
                            last_error=None)

    def _record_error(self, message: str) -> None:
        with self._state_lock:
            self.last_error = message
        LOG.error("%s", message)
        self._write_service(last_error=message[:4000])

    def _write_service(self, **values) -> None:
        try:
            db.service_update(self.host, driver=self.driver.describe(), **values)
        except Exception as exc:  # noqa: BLE001 - the database may be down; the kernel keeps its rules
            LOG.warning("could not update the service row of %s: %s", self.host, exc)
