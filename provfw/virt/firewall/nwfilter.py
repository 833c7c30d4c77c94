"""NWFilterFirewall: provider rules as a libvirt nwfilter that every instance filter references.

Design
------
The driver owns one nwfilter, ``[libvirt] provider_filter`` (``nova-provider``).
Instance filters (``nova-instance-*``) reference it with ``<filterref
filter='nova-provider'/>``; libvirt inlines the provider rules into every port
bound to such a filter and, when the provider filter is redefined,
re-instantiates every port that uses it.  Layout, direction and priority are
described in ``firewall.nwfilter_xml`` and docs/nwfilter.md.

A full plan (pure functions in ``nwfilter_xml`` and ``firewall.ipset``) is:

1. sets (ipset mode): ONE ``ipset restore`` that creates, fills, swaps or
   updates the host sets, planned by ``ipset.plan_sets`` against ``ipset
   save`` - the same code as the ipset driver's sets;
2. chains: a ``Call`` that reads the filter libvirt holds and redefines it
   only when the matching content differs - with the existing UUID, because
   libvirt identifies filters by UUID and refuses a same-named filter with
   another one, and because keeping it makes the update live on every port
   that references it.  After the define it reads the filter back and fails
   loudly if libvirt stored something else (libvirt silently drops
   attributes it does not like).  With ``[libvirt] ensure_filter_refs`` a
   second ``Call`` adds the reference to instance filters missing it
   (``ensure_filter_refs``);
3. deletions: host sets the filter no longer references.

Two ways to match sources (``[libvirt] match_mode``):

* ``rules``: one nwfilter rule per spec.  libvirt turns each into iptables/
  ebtables processes per bound port (measured: ~30 ms per rule per port at
  1k rules, worse at 10k), so a redefinition with thousands of rules takes
  minutes, and every packet walks the list.
* ``ipset``: the protocol-``all`` specs of each family become ONE rule that
  matches a host ``hash:net`` ipset (``<ipset_prefix>4-all-any``).  Adding
  or removing such a CIDR changes only the set - no libvirt call, no
  re-instantiation - and the packet cost does not grow with the number of
  CIDRs.  libvirt 9.0 cannot match ipsets on tcp/udp/icmp elements (see
  ``nwfilter_xml``), so port- or protocol-specific specs stay one rule per
  CIDR in this mode too.  ``auto`` uses sets past ``ipset_threshold`` rules.

The driver keeps nothing between calls.  ``NWFilterState`` - the match mode
of the filter defined last and the sets it references with their sizes - is
what ``plan_delta`` needs: a change that is set members only (ipset mode
before and after, every changed spec set-matchable, no set appearing,
emptying or outgrowing its ``maxelem``) is one ``ipset restore`` and nothing
else; anything else (a mode switch, a new group, a per-CIDR rule) is
``None``, i.e. a full plan.

Never fail open: libvirt builds a port's new chains before it switches them
in, and a define that libvirt cannot instantiate fails and keeps the previous
filter; sets are filled before the filter references them, rebuilt through a
temporary set + ``ipset swap`` (never flush-then-add), and destroyed only
after the new filter no longer references them.

libvirtd down or restarting: every libvirt error becomes a ``DriverError``
(the reconciler records it and keeps the previous state as applied); the
kernel keeps the previously instantiated rules, and the next refresh
reconnects and applies.  Planning asks libvirt nothing and the set step
runs before the filter step, so in ipset mode new CIDRs of an existing group
are enforced even while libvirtd is away.

``plan_check`` defines a scratch filter ``<provider_filter>-check`` with the
specs' rules (and, in ipset mode, fills scratch host sets), reads it back and
undefines it in the same step; no instance filter references it, so libvirt
never instantiates it, and nothing is left behind, also when it fails.

Thread-safety: plans and writes serialise on ``PlannedFirewallDriver``'s
locks; the own libvirt connection is guarded by its own lock;
``ensure_filter_refs`` holds no state.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
import time
from typing import Callable, Collection, Iterable, Mapping, Sequence

from oslo_config import cfg

from provfw import conf as provfw_conf
from provfw import exception, runner as runner_mod
from provfw.rules import RuleSpec
from provfw.virt.firewall import base, ipset
from provfw.virt.firewall import nwfilter_xml as nwx
from provfw.virt.libvirt_conn import LibvirtConnector, import_libvirt as _libvirt

LOG = logging.getLogger(__name__)


def _is_missing_filter(exc) -> bool:
    libvirt = _libvirt()
    return exc.get_error_code() == libvirt.VIR_ERR_NO_NWFILTER


# ---------------------------------------------------------------- instance filter references

def ensure_filter_refs(conn, pattern: str, provider_filter: str) -> list[str]:
    """Add ``<filterref filter=provider_filter/>`` to every nwfilter whose name matches ``pattern``.

    ``pattern`` is an fnmatch pattern (``nova-instance-*``).  Filters that
    already reference the provider filter are left alone, so the call is
    idempotent; each redefinition keeps the filter's UUID (libvirt's XMLDesc
    carries it), so bound ports are updated in place.  Returns the names of
    the filters changed, sorted.  Raises DriverError when the provider filter
    does not exist (a reference to a missing filter breaks every port that
    uses it) or when some filters could not be redefined - after having
    updated all the others.
    """
    libvirt = _libvirt()
    try:
        try:
            conn.nwfilterLookupByName(provider_filter)
        except libvirt.libvirtError as exc:
            if _is_missing_filter(exc):
                raise exception.DriverError(f"nwfilter {provider_filter!r} is not defined; refresh the provider "
                                            "rules first") from None
            raise
        changed, failed = [], []
        for nwfilter in conn.listAllNWFilters():
            name = nwfilter.name()
            if name == provider_filter or not fnmatch.fnmatchcase(name, pattern):
                continue
            try:
                new_xml = nwx.add_filterref(nwfilter.XMLDesc(), provider_filter)
                if new_xml is None:
                    continue
                conn.nwfilterDefineXML(new_xml)
            except libvirt.libvirtError as exc:
                if _is_missing_filter(exc):
                    continue            # undefined while we looked at it
                failed.append(f"{name}: {exc}")
                continue
            LOG.info("nwfilter %s now references %s", name, provider_filter)
            changed.append(name)
    except libvirt.libvirtError as exc:
        raise exception.DriverError(f"libvirt: {exc}") from None
    if failed:
        raise exception.DriverError(f"could not add filterref {provider_filter!r} to {len(failed)} filter(s) "
                                    f"(updated: {sorted(changed)}): " + "; ".join(failed))
    return sorted(changed)


# ---------------------------------------------------------------- the driver

@dataclasses.dataclass(frozen=True)
class NWFilterState:
    """What the kernel and libvirt accepted last: ``mode`` (``rules``/``ipset``) of the filter defined,
    and the host sets it references with their sizes (read-only)."""

    mode: str
    sets: Mapping[str, ipset.SetSize]


class NWFilterFirewall(base.PlannedFirewallDriver):
    """Provider rules as the libvirt nwfilter ``[libvirt] provider_filter`` (see the module docstring)."""

    name = "nwfilter"
    uses_libvirt = True         # LibvirtConnection hands it its own connection (get_connection)

    def __init__(self, conf: cfg.ConfigOpts = provfw_conf.CONF, runner: runner_mod.Runner | None = None,
                 get_connection: Callable | None = None):
        # libvirtd filters the host's bridges: its ipsets live in the host namespace, whatever dataplane_netns says.
        super().__init__(conf, runner or runner_mod.Runner())
        self.filter_name = conf.libvirt.provider_filter
        self.check_filter_name = f"{self.filter_name}-check"
        try:
            self.naming = ipset.SetNaming(conf.libvirt.ipset_prefix)
        except exception.ConfigError as exc:
            raise exception.ConfigError(f"[libvirt] ipset_prefix: {exc}") from None
        self.netlink = ipset.netlink_for(self.runner)
        self._own_connector = None
        if get_connection is None:
            self._own_connector = LibvirtConnector(conf.libvirt.uri)
            get_connection = self._own_connector
        self._get_connection = get_connection

    # ------------------------------------------------------------ helpers

    def mode_for(self, count: int) -> str:
        """``rules`` or ``ipset`` for a filter of ``count`` rules (``[libvirt] match_mode``, ``ipset_threshold``)."""
        mode = self.conf.libvirt.match_mode
        if mode == "auto":
            return "ipset" if count > self.conf.libvirt.ipset_threshold else "rules"
        return mode

    def _with_libvirt(self, func, *args):
        """Run ``func(conn, *args)``; libvirt errors (libvirtd down, restarting, refusing) become DriverError."""
        libvirt = _libvirt()
        conn = self._get_connection()
        try:
            return func(conn, *args)
        except libvirt.libvirtError as exc:
            raise exception.DriverError(f"libvirt ({self.conf.libvirt.uri}): {exc}") from None

    @staticmethod
    def _lookup(conn, name: str):
        libvirt = _libvirt()
        try:
            return conn.nwfilterLookupByName(name)
        except libvirt.libvirtError as exc:
            if _is_missing_filter(exc):
                return None
            raise

    def current_filter(self) -> nwx.FilterDef | None:
        """The provider filter as libvirt holds it now (None when undefined)."""
        def read(conn):
            existing = self._lookup(conn, self.filter_name)
            return None if existing is None else nwx.parse_filter(existing.XMLDesc())
        return self._with_libvirt(read)

    def _owned_sets(self, required: bool) -> dict[str, ipset.KernelSet]:
        """Our host sets; without the ipset tool there are none - unless ``required`` (ipset mode)."""
        try:
            return ipset.read_sets(self.runner, self.naming.owns)
        except exception.ToolMissing:
            if required:
                raise
            return {}

    def _sync_filter(self, conn, desired: nwx.FilterDef) -> bool:
        """Redefine the provider filter when its content differs (keeping its UUID); read it back."""
        existing = self._lookup(conn, self.filter_name)
        uuid = None
        if existing is not None:
            current = nwx.parse_filter(existing.XMLDesc())
            if current.same_content(desired):
                return False
            uuid = current.uuid
        started = time.monotonic()
        defined = conn.nwfilterDefineXML(nwx.render_filter(dataclasses.replace(desired, uuid=uuid)))
        stored = nwx.parse_filter(defined.XMLDesc())
        if not stored.same_content(desired) or (uuid is not None and stored.uuid != uuid):
            raise exception.DriverError(
                f"libvirt stored nwfilter {self.filter_name} differently from what provfw defined "
                f"({_first_difference(desired, stored)}); refusing to record it as applied")
        LOG.info("defined nwfilter %s (%d rules, uuid %s) in %.2fs", self.filter_name, len(desired.rules),
                 stored.uuid, time.monotonic() - started)
        return True

    def _check_filter(self, conn, desired: nwx.FilterDef) -> bool:
        """Define the scratch filter, read it back, undefine it - whatever happens in between."""
        libvirt = _libvirt()
        leftover = self._lookup(conn, desired.name)
        if leftover is not None:
            leftover.undefine()
        try:
            stored = nwx.parse_filter(conn.nwfilterDefineXML(nwx.render_filter(desired)).XMLDesc())
            if not stored.same_content(desired):
                raise exception.DriverError(f"libvirt stores these rules differently from what provfw defines "
                                            f"({_first_difference(desired, stored)})")
        finally:
            try:
                scratch = self._lookup(conn, desired.name)
                if scratch is not None:
                    scratch.undefine()
            except libvirt.libvirtError as exc:
                LOG.warning("could not undefine scratch nwfilter %s: %s", desired.name, exc)
        return False

    # ------------------------------------------------------------ plans

    def plan_full(self, desired: Collection[RuleSpec]) -> base.Plan:
        mode = self.mode_for(len(desired))
        rules, groups = nwx.provider_rules(desired, mode == "ipset", self.naming.name)
        members = {key: {ipset.member(cidr) for cidr in cidrs} for key, cidrs in groups.items()}
        planned = ipset.plan_sets(members, self._owned_sets(required=bool(members)), self.naming, self.conf)
        wanted = nwx.provider_filter(self.filter_name, rules)
        # Sets first: the filter may only reference existing sets, and a set that is already
        # referenced enforces its new members at once, whatever libvirtd is doing.
        chains = [base.Call(lambda: self._with_libvirt(self._sync_filter, wanted),
                            f"define nwfilter {self.filter_name} ({len(rules)} rules, {mode} mode)")]
        if self.conf.libvirt.ensure_filter_refs:
            # New instances appear without any rule change: every full plan (drift checks too) looks for them.
            chains.append(base.Call(self.ensure_filter_refs,
                                    f"filterref {self.filter_name} in {self.conf.libvirt.instance_filter_pattern}"))
        # Only after the define does no filter reference the sets we no longer need.
        return base.Plan(NWFilterState(mode, planned.sizes), sets=planned.restore_steps(self.runner, self.netlink),
                         chains=tuple(chains), deletions=planned.deletion_steps())

    def plan_delta(self, added: Sequence[RuleSpec], removed: Sequence[RuleSpec], state: NWFilterState,
                   desired_count: int) -> base.Plan | None:
        """Set members only, in O(change); ``None`` whenever the filter itself would change."""
        if state.mode != "ipset" or self.mode_for(desired_count) != "ipset":
            return None
        adds = self._set_members(added)
        dels = self._set_members(removed)
        if adds is None or dels is None:
            return None
        planned = ipset.plan_members(adds, dels, state.sets)
        if planned is None:
            return None
        step, sizes = planned
        return base.Plan(NWFilterState("ipset", sizes), sets=(ipset.member_step(step, self.runner, self.netlink),),
                         mode="delta")

    def _set_members(self, specs: Iterable[RuleSpec]) -> dict[str, set[str]] | None:
        """{set name: members} of ``specs``; None if one of them is not set-matchable (a per-CIDR rule)."""
        grouped: dict[nwx.GroupKey, set[str]] = {}
        for spec in specs:
            key = nwx.group_key(spec)
            if not nwx.set_matchable(key):
                return None
            grouped.setdefault(key, set()).add(ipset.member(spec.cidr))
        return {self.naming.name(key): members for key, members in grouped.items()}

    def plan_check(self, specs: Collection[RuleSpec]) -> base.Plan:
        """The specs in the scratch filter (and scratch sets) in the mode a filter of that size would use."""
        mode = self.mode_for(len(specs))
        rules, groups = nwx.provider_rules(specs, mode == "ipset", lambda key: self.naming.scratch(key.version))
        lines: list[str] = []
        scratch = []
        for key, cidrs in sorted(groups.items()):
            name = self.naming.scratch(key.version)
            scratch.append(name)
            lines += ipset.scratch_lines(name, key.family, [ipset.member(c) for c in cidrs])
        cleanup = tuple(("ipset", "destroy", name) for name in scratch)
        fill = (base.Command(("ipset", "restore", "-exist"), "\n".join(lines) + "\n", cleanup=cleanup,
                             what=f"ipset restore of scratch sets {scratch}"),) if lines else ()
        wanted = nwx.provider_filter(self.check_filter_name, rules)
        define = base.Call(lambda: self._with_libvirt(self._check_filter, wanted),
                           f"define and undefine scratch nwfilter {self.check_filter_name}", cleanup=cleanup)
        return base.Plan(None, sets=fill, chains=(define,), deletions=ipset.destroy_steps(scratch), mode="check")

    # ------------------------------------------------------------ other calls

    def ensure_filter_refs(self) -> list[str]:
        """``ensure_filter_refs`` for this driver's pattern and provider filter, through its connection."""
        return self._with_libvirt(ensure_filter_refs, self.conf.libvirt.instance_filter_pattern, self.filter_name)

    def teardown(self) -> None:
        """Empty the provider filter (undefine it when nothing references it) and destroy our host sets.

        Raises DriverError naming any set that could not be destroyed.
        """
        def empty_and_undefine(conn):
            existing = self._lookup(conn, self.filter_name)
            if existing is None:
                return False
            uuid = nwx.parse_filter(existing.XMLDesc()).uuid
            conn.nwfilterDefineXML(nwx.render_filter(nwx.provider_filter(self.filter_name, (), uuid)))
            try:
                conn.nwfilterLookupByName(self.filter_name).undefine()
            except _libvirt().libvirtError as exc:
                LOG.info("nwfilter %s left defined and empty: %s", self.filter_name, exc)
            return True

        with self.applying():
            owned = sorted(self._owned_sets(required=False))
            empty = base.Call(lambda: self._with_libvirt(empty_and_undefine), f"empty nwfilter {self.filter_name}")
            base.execute(base.Plan(None, chains=(empty,), deletions=ipset.destroy_steps(owned)), self.runner)
            left = sorted(self._owned_sets(required=False))
        if left:
            raise exception.DriverError(f"nwfilter teardown could not destroy host set(s) {left} (still referenced?)")

    def close(self) -> None:
        if self._own_connector is not None:
            self._own_connector.close()


def _first_difference(desired: nwx.FilterDef, stored: nwx.FilterDef) -> str:
    for index, (want, got) in enumerate(zip(desired.rules, stored.rules)):
        if want != got:
            return f"rule {index}: wanted {want}, libvirt has {got}"
    if len(desired.rules) != len(stored.rules):
        return f"{len(desired.rules)} rules wanted, libvirt has {len(stored.rules)}"
    return (f"filter attributes/refs: wanted {desired.chain}/{desired.filterrefs}, "
            f"got {stored.chain}/{stored.filterrefs}")
