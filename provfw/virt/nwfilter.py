"""NWFilterFirewall: provider rules as a libvirt nwfilter that every instance filter references.

Design
------
The driver owns one nwfilter, ``[libvirt] provider_filter`` (``nova-provider``).
Instance filters (``nova-instance-*``) reference it with ``<filterref
filter='nova-provider'/>``; libvirt inlines the provider rules into every port
bound to such a filter and, when the provider filter is redefined,
re-instantiates every port that uses it.  Layout, direction and priority are
described in ``provfw.virt.nwfilter_xml`` and docs/nwfilter.md.

``apply_full(specs)`` computes the desired filter (pure functions in
``nwfilter_xml``), reads the filter libvirt holds, and redefines it only when
the matching content differs - with the existing UUID, because libvirt
identifies filters by UUID and refuses a same-named filter with another one,
and because keeping it makes the update live on every port that references
it.  After the define it reads the filter back and fails loudly if libvirt
stored something else (libvirt silently drops attributes it does not like).

Two ways to match sources (``[libvirt] match_mode``):

* ``rules``: one nwfilter rule per spec.  libvirt turns each into iptables/
  ebtables processes per bound port (measured: ~30 ms per rule per port at
  1k rules, worse at 10k), so a redefinition with thousands of rules takes
  minutes, and every packet walks the list.
* ``ipset``: the protocol-``all`` specs of each family become ONE rule that
  matches a host ``hash:net`` ipset kept by this module (``HostIpsets``).
  Adding or removing such a CIDR changes only the set - no libvirt call, no
  re-instantiation - and the packet cost does not grow with the number of
  CIDRs.  libvirt 9.0 cannot match ipsets on tcp/udp/icmp elements (see
  ``nwfilter_xml``), so port- or protocol-specific specs stay one rule per
  CIDR in this mode too.  ``auto`` uses sets past ``ipset_threshold`` rules.

Never fail open: libvirt builds a port's new chains before it switches them
in, and a define that libvirt cannot instantiate fails and keeps the previous
filter; sets are filled before the filter references them, rebuilt through a
temporary set + ``ipset swap`` (never flush-then-add), and destroyed only
after the new filter no longer references them.

libvirtd down or restarting: every libvirt error becomes a ``DriverError``
(the compute manager records it and keeps running); the kernel keeps the
previously instantiated rules, the base class keeps the previous bookkeeping,
and the next refresh reconnects and applies.  In ipset mode the set changes
are written before libvirt is asked anything, so new CIDRs of an existing
group are enforced even while libvirtd is away.

Thread-safety: the public methods serialise on the base class's lock (and
the per-host file lock); the own libvirt connection is guarded by its own
lock; ``ensure_filter_refs`` holds no state.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import ipaddress
import logging
import time
from typing import Callable, Mapping, Sequence

from oslo_config import cfg

from provfw import conf as provfw_conf
from provfw import exception, names, runner as runner_mod
from provfw.rules import RuleSpec
from provfw.virt import firewall
from provfw.virt.libvirt_conn import LibvirtConnector, import_libvirt as _libvirt
from provfw.virt import nwfilter_xml as nwx

LOG = logging.getLogger(__name__)

IPSET_PREFIX_MAX = 16       # leaves room for "6-icmp-255-255-t" within names.IPSET_NAME_MAX
def _is_missing_filter(exc) -> bool:
    libvirt = _libvirt()
    return exc.get_error_code() == libvirt.VIR_ERR_NO_NWFILTER


# ---------------------------------------------------------------- host ipsets (ipset mode)

@dataclasses.dataclass
class SetInfo:
    type: str
    family: str
    maxelem: int
    members: set[str]


def _canonical_member(text: str) -> str:
    # ipset prints /32 and /128 entries without a prefix; RuleSpec CIDRs always carry one.
    return ipaddress.ip_network(text, strict=False).with_prefixlen


def _option(words: list[str], key: str, default):
    # "create" options are "key value" pairs mixed with bare flags (counters, comment, ...): find keys by name.
    return words[words.index(key) + 1] if key in words[:-1] else default


def parse_ipset_save(text: str) -> SetInfo | None:
    """Parse ``ipset save <name>`` for one set."""
    info = None
    for line in text.splitlines():
        words = line.split()
        if len(words) >= 3 and words[0] == "create":
            options = words[3:]
            info = SetInfo(words[2], _option(options, "family", "inet"), int(_option(options, "maxelem", 65536)),
                           set())
        elif len(words) >= 3 and words[0] == "add" and info is not None:
            info.members.add(_canonical_member(words[2]))
    return info


class HostIpsets:
    """The host ``hash:net`` sets behind the provider filter, one per set-matchable group.

    Named by ``names.set_name`` (``pfn4-all-any``, ``pfn6-all-any``).

    Every set whose name is ``<prefix>4-...`` or ``<prefix>6-...`` belongs to
    this class.  ``sync`` writes all changes as one ``ipset -exist restore``
    run: small changes as add/del (adds first), large ones or resizes as a
    full rebuild into ``<name>-t`` followed by ``swap`` - a referenced set is
    never emptied.  Thread-safety: none of its own; the driver's lock covers it.
    """

    TEMP_SUFFIX = "-t"
    SET_TYPE = "hash:net"

    def __init__(self, runner: runner_mod.Runner, prefix: str, sets_conf):
        if not prefix or len(prefix) > IPSET_PREFIX_MAX or " " in prefix:
            raise exception.ConfigError(f"[libvirt] ipset_prefix {prefix!r} must be 1-{IPSET_PREFIX_MAX} "
                                        "characters without spaces")
        self.runner = runner
        self.prefix = prefix
        self.min_size = sets_conf.min_set_size
        self.headroom = sets_conf.headroom
        self.full_rebuild_delta = sets_conf.full_rebuild_delta

    def name_for(self, key: nwx.GroupKey) -> str:
        return names.set_name(self.prefix, key.version, key.protocol, key.from_port, key.to_port)

    def owns(self, name: str) -> bool:
        rest = name[len(self.prefix):]
        return name.startswith(self.prefix) and rest[:2] in ("4-", "6-")

    def size_for(self, count: int) -> int:
        return max(self.min_size, int(count * self.headroom))

    def existing(self) -> set[str]:
        """Names of our sets in the kernel (temporary ones included); empty if ipset is not installed."""
        try:
            out = self.runner(["ipset", "list", "-n"])
        except exception.ProcessExecutionError as exc:
            if exc.exit_code == 127:
                return set()
            raise
        return {name for name in out.split() if self.owns(name)}

    def info(self, name: str) -> SetInfo | None:
        return parse_ipset_save(self.runner(["ipset", "save", name]))

    def _create(self, name: str, family: str, count: int) -> str:
        return f"create {name} {self.SET_TYPE} family {family} maxelem {self.size_for(count)}"

    def build_restore(self, desired: Mapping[str, nwx.SetSpec], existing: set[str],
                      infos: Mapping[str, SetInfo | None]) -> list[str]:
        """The ``ipset restore`` lines that make the kernel hold ``desired`` (set name -> SetSpec)."""
        lines = []
        for name in sorted(existing):
            if name.endswith(self.TEMP_SUFFIX):
                lines.append(f"destroy {name}")         # left by an interrupted rebuild; never referenced
        for name, spec in sorted(desired.items()):
            family, want = spec.family, {_canonical_member(c) for c in spec.cidrs}
            info = infos.get(name) if name in existing else None
            if info is None:
                lines.append(self._create(name, family, len(want)))
                lines.extend(f"add {name} {cidr}" for cidr in sorted(want))
                continue
            if info.members == want:
                continue
            added, removed = sorted(want - info.members), sorted(info.members - want)
            compatible = info.type == self.SET_TYPE and info.family == family
            if compatible and len(want) <= info.maxelem and len(added) + len(removed) <= self.full_rebuild_delta:
                # Adds first: mid-way the set blocks at least what the old and the new state both block.
                lines.extend(f"add {name} {cidr}" for cidr in added)
                lines.extend(f"del {name} {cidr}" for cidr in removed)
                continue
            temp = name + self.TEMP_SUFFIX
            lines.append(self._create(temp, family, len(want)))
            lines.extend(f"add {temp} {cidr}" for cidr in sorted(want))
            lines.append(f"swap {temp} {name}")
            lines.append(f"destroy {temp}")
        return lines

    def sync(self, desired: Mapping[str, nwx.SetSpec]) -> bool:
        """Create/fill/rebuild the desired sets; never destroys a set (see ``destroy_unused``)."""
        existing = self.existing()
        infos = {name: self.info(name) for name in desired if name in existing}
        lines = self.build_restore(desired, existing, infos)
        if not lines:
            return False
        self.runner(["ipset", "-exist", "restore"], input="\n".join(lines) + "\n")
        return True

    def update_members(self, adds: Mapping[str, Sequence[str]], dels: Mapping[str, Sequence[str]]) -> bool:
        """Add and delete members of existing sets in one ``ipset restore`` run, adds first."""
        lines = [f"add {name} {cidr}" for name, cidrs in sorted(adds.items()) for cidr in cidrs]
        lines += [f"del {name} {cidr}" for name, cidrs in sorted(dels.items()) for cidr in cidrs]
        if not lines:
            return False
        self.runner(["ipset", "-exist", "restore"], input="\n".join(lines) + "\n")
        return True

    def destroy_unused(self, keep: set[str]) -> bool:
        """Destroy our sets not in ``keep`` (call only once no filter references them)."""
        changed = False
        for name in sorted(self.existing() - keep):
            try:
                self.runner(["ipset", "destroy", name])
                changed = True
            except exception.ProcessExecutionError as exc:
                # Still referenced (a port libvirt has not re-instantiated yet): harmless, retried next apply.
                LOG.warning("could not destroy unused ipset %s yet: %s", name, exc.stderr.strip())
        return changed


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

class NWFilterFirewall(firewall.ProviderFirewallBase):
    """Provider rules as the libvirt nwfilter ``[libvirt] provider_filter``."""

    name = "nwfilter"
    supports_delta = True       # ipset mode: a change to set members is an ipset add/del, nothing else

    def __init__(self, conf: cfg.ConfigOpts = provfw_conf.CONF, runner: runner_mod.Runner | None = None,
                 get_connection: Callable | None = None):
        # libvirtd filters the host's bridges: its ipsets live in the host namespace, whatever dataplane_netns says.
        super().__init__(conf, runner or runner_mod.Runner())
        self.filter_name = conf.libvirt.provider_filter
        self._own_connector = None
        if get_connection is None:
            self._own_connector = LibvirtConnector(conf.libvirt.uri)
            get_connection = self._own_connector
        self._get_connection = get_connection
        self.ipsets = HostIpsets(self.runner, conf.libvirt.ipset_prefix, conf.sets)
        self.match_mode: str | None = None      # mode of the last successful apply
        self._referenced_sets: frozenset[str] = frozenset()    # sets the filter defined last references
        self._set_sizes: dict[str, int] = {}                    # members per referenced set, as applied

    # ------------------------------------------------------------ helpers

    def mode_for(self, count: int) -> str:
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

    def _lookup(self, conn):
        libvirt = _libvirt()
        try:
            return conn.nwfilterLookupByName(self.filter_name)
        except libvirt.libvirtError as exc:
            if _is_missing_filter(exc):
                return None
            raise

    def current_filter(self) -> nwx.FilterDef | None:
        """The provider filter as libvirt holds it now (None when undefined)."""
        def read(conn):
            existing = self._lookup(conn)
            return None if existing is None else nwx.parse_filter(existing.XMLDesc())
        return self._with_libvirt(read)

    def _define(self, conn, rules: tuple[nwx.FilterRule, ...]) -> bool:
        desired = nwx.provider_filter(self.filter_name, rules)
        existing = self._lookup(conn)
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
        LOG.info("defined nwfilter %s (%d rules, uuid %s) in %.2fs", self.filter_name, len(rules), stored.uuid,
                 time.monotonic() - started)
        return True

    # ------------------------------------------------------------ driver hooks

    def apply_full(self, specs: Sequence[RuleSpec]) -> bool:
        mode = self.mode_for(len(set(specs)))
        rules, desired_sets = nwx.provider_rules(specs, mode == "ipset", self.ipsets.name_for)
        # Sets first: the filter may only reference existing sets, and a set that is already
        # referenced enforces its new members at once, whatever libvirtd is doing.
        changed = self.ipsets.sync(desired_sets) if desired_sets else False
        changed |= self._with_libvirt(self._define, rules)
        self._referenced_sets = frozenset(desired_sets)
        self._set_sizes = {name: len(spec.cidrs) for name, spec in desired_sets.items()}
        self.match_mode = mode
        # Only now does no filter reference the sets we no longer need.
        changed |= self.ipsets.destroy_unused(set(desired_sets))
        return changed

    def apply_delta(self, added: Sequence[RuleSpec], removed: Sequence[RuleSpec]) -> bool:
        """Set members only when that is the whole change; otherwise a full apply of the new state.

        The base class calls this before it commits, so ``self._rules`` still
        holds the applied state; ``added`` are not in it and ``removed`` are.
        The quick path costs O(change): it needs ipset mode before and after,
        every changed spec set-matchable, and the same sets referenced (no
        group appears or empties), so the filter itself stays as it is.
        """
        plan = self._set_member_plan(len(self._rules) - len(removed) + len(added), added, removed)
        if plan is not None:
            adds, dels, sizes = plan
            try:
                self.ipsets.update_members(adds, dels)
                self._set_sizes = sizes
                return True
            except exception.ProcessExecutionError as exc:
                # A set vanished or is full: the full path rebuilds whatever is wrong.
                LOG.warning("set member update failed (%s); applying the full state", exc)
        gone = set(removed)
        return self.apply_full([s for s in self._rules if s not in gone] + list(added))

    def _set_member_plan(self, count: int, added, removed):
        """(adds, dels, new set sizes) when the change is set members only, else None."""
        if self.match_mode != "ipset" or self.mode_for(count) != "ipset":
            return None
        adds: dict[str, list[str]] = {}
        dels: dict[str, list[str]] = {}
        sizes = dict(self._set_sizes)
        for specs, target, step in ((added, adds, 1), (removed, dels, -1)):
            for spec in specs:
                key = nwx.group_key(spec)
                if not nwx.set_matchable(key):
                    return None
                name = self.ipsets.name_for(key)
                if name not in self._referenced_sets:
                    return None                 # a new group: the filter needs a new rule
                target.setdefault(name, []).append(spec.cidr)
                sizes[name] += step
        if any(size <= 0 for size in sizes.values()):
            return None                         # a group empties: the filter loses a rule
        return adds, dels, sizes

    def ensure_filter_refs(self) -> list[str]:
        """``ensure_filter_refs`` for this driver's pattern and provider filter, through its connection."""
        return self._with_libvirt(ensure_filter_refs, self.conf.libvirt.instance_filter_pattern, self.filter_name)

    def refresh_provider_fw_rules(self, full: bool = False) -> firewall.ApplyResult:
        result = super().refresh_provider_fw_rules(full)
        # New instances appear without any rule change; with ensure_filter_refs every refresh looks for them.
        if self.conf.libvirt.ensure_filter_refs:
            with self._lock:
                if self.ensure_filter_refs():
                    result = dataclasses.replace(result, changed=True)
        return result

    def repair_drift(self) -> bool:
        repaired = super().repair_drift()
        if self.conf.libvirt.ensure_filter_refs and self._generation is not None:
            with self._lock:
                repaired |= bool(self.ensure_filter_refs())
        return repaired

    def teardown(self) -> None:
        """Empty the provider filter (undefine it when nothing references it) and destroy our ipsets."""
        def empty_and_undefine(conn):
            existing = self._lookup(conn)
            if existing is None:
                return
            uuid = nwx.parse_filter(existing.XMLDesc()).uuid
            conn.nwfilterDefineXML(nwx.render_filter(nwx.provider_filter(self.filter_name, (), uuid)))
            try:
                conn.nwfilterLookupByName(self.filter_name).undefine()
            except _libvirt().libvirtError as exc:
                LOG.info("nwfilter %s left defined and empty: %s", self.filter_name, exc)

        with self._lock:
            self._with_libvirt(empty_and_undefine)
            self.ipsets.destroy_unused(set())
            self._commit(None, replace={})
            self._generation = None
            self.match_mode = None
            self._referenced_sets = frozenset()
            self._set_sizes = {}

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
