"""ipset: the one module for every user of kernel ipsets, and ``IpsetFirewallDriver``.

Design
------
Three users keep ``hash:net`` sets: ``IpsetFirewallDriver`` (prefix ``pfw``),
``IptcFirewallDriver`` (the same sets) and ``NWFilterFirewall`` in ipset mode
(``[libvirt] ipset_prefix``).  Each owns every set named ``<prefix>4-...`` or
``<prefix>6-...`` (``SetNaming``) and nothing else; they all plan with the
pure functions here:

* ``parse_save`` reads ``ipset save`` into the owned sets with their members
  in ipset's spelling (``member``: host networks lose their /32 or /128), so
  desired members compare to the kernel's without parsing 120k addresses
  (only IPv6 members printed with a dotted tail, ``::1.2.3.4``, are re-spelt:
  ``sets.canonical_members``).
  Create options are found by name: bare flags (``counters``, ``comment``)
  cannot shift them.
* ``plan_sets`` picks, per set, the cheapest change that never opens a
  window: nothing when it matches; in-place ``add``/``del`` lines for a
  small difference (adds first - members that stay are never removed; dels
  first only when the adds alone would pass ``maxelem``); otherwise a
  TEMPORARY set (``...-t``), created with the right size, filled, and
  ``swap``-ped with the live set.  ``ipset restore`` itself is not atomic (a
  flush-then-restore let 117,574 blocked packets through during ten
  10k-entry rebuilds); the swap is.  Sets are sized BEFORE they are filled
  (``capacity``, ``hash_size``); a live set too small for its desired content
  is rebuilt into a bigger temporary set (swap accepts a different
  ``maxelem``).  All of it is ONE step (``SetsPlan``): creates and fills,
  then swaps, then in-place changes - one ``ipset restore -exist``, or, for
  large fills, the fills over netlink between two (``fill_step`` below).
  If the step fails ("Hash is full", memory) its cleanup destroys the
  temporary and new sets -
  none is referenced yet and no swap has run - so a partly filled set is
  never left in place.  Sets no longer wanted are destroyed in the plan's
  deletion phase, after the chains stopped referencing them.
* ``plan_members`` is a delta: one ``ipset restore -exist`` of add/del lines
  computed from the caller's ``SetSize`` values alone (no kernel read), or
  ``None`` when the change is structural - a set appears, empties, or would
  outgrow its ``maxelem`` - so the caller plans a full rebuild instead.
  The drivers send those lines as netlink messages (``member_step``,
  ``ipset_netlink``): a one-CIDR delta costs tens of microseconds instead
  of a 2-6 ms ``ipset`` (and ``nsenter``) process, a large one goes in bulk
  messages; the restore stays wherever no netlink socket can be had.
* A full plan's fills go the same way (``fill_step``): the tool keeps the
  creates, swaps and in-place lines, and the members of the sets it creates
  go as bulk netlink messages - the ``ipset`` tool spent 0.3 s
  of user CPU parsing a 120k-member fill, on every host at once after an
  import.  The order is the restore's: sets created, filled, then swapped.

``IpsetFirewallDriver`` puts each match key's sources in one set
(``pfw4-tcp-1-65535``) and ``nova-provider`` holds ONE rule per group::

    -A nova-provider -p tcp -m set --match-set pfw4-tcp-1-65535 src -m multiport --dports 1:65535 \\
        -m comment --comment provfw:<hash> -j DROP
    -A nova-provider -m comment --comment provfw:<hash> -j nova-local

with FORWARD's first rule jumping there, exactly as the linear chain
(rendered and diffed with ``firewall.iptables``).  A packet costs one hash
lookup per prefix length per group instead of one rule per network.  Its
full plan is: sets (the restore above), chains (``iptables-restore
--noflush`` per family that differs), deletions (``ipset destroy`` of
obsolete sets).  Its state between calls is ``SetsState``: per set, member
count and ``maxelem`` - what a delta needs, nothing more.  ``plan_check``
creates, fills and destroys a scratch set per family (``pfw4-check``) and
runs ``iptables-restore --test`` of the group rules against it.

Thread-safety: the functions are pure; the driver keeps no state between
calls and serialises on ``PlannedFirewallDriver``'s locks.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
from typing import Callable, Collection, Iterable, Mapping, Sequence

from oslo_config import cfg

from provfw import conf as provfw_conf
from provfw import exception, names, runner as runner_mod
from provfw.rules import RuleSpec
from provfw.virt.firewall import base, ipset_netlink, iptables
from provfw.virt.firewall import sets as sets_mod
from provfw.virt.firewall.sets import MatchKey

LOG = logging.getLogger(__name__)

SET_TYPE = "hash:net"
TEMP_SUFFIX = "-t"
PREFIX_MAX = 16         # "<prefix>6-icmp-255-255-t" stays readable within names.IPSET_NAME_MAX
DEFAULT_MAXELEM = 65536  # what ipset gives a set created without maxelem


# --------------------------------------------------------------------------- names and spelling

@dataclasses.dataclass(frozen=True)
class SetNaming:
    """The sets one user owns: every name ``<prefix>4-...`` / ``<prefix>6-...``.

    Raises ``ConfigError`` for a prefix that is empty, longer than
    ``PREFIX_MAX`` characters or contains a space.
    """

    prefix: str

    def __post_init__(self):
        if not self.prefix or len(self.prefix) > PREFIX_MAX or " " in self.prefix:
            raise exception.ConfigError(f"ipset prefix {self.prefix!r} must be 1-{PREFIX_MAX} characters "
                                        "without spaces")

    def name(self, key: MatchKey, temporary: bool = False) -> str:
        """``pfw4-tcp-22``; with ``temporary`` the swap rebuild's ``pfw4-tcp-22-t`` (<= 31 characters)."""
        return names.set_name(self.prefix, key.version, key.protocol, key.from_port, key.to_port,
                              TEMP_SUFFIX if temporary else "")

    def owns(self, name: str) -> bool:
        return name.startswith(self.prefix) and name[len(self.prefix):len(self.prefix) + 2] in ("4-", "6-")

    def scratch(self, version: int) -> str:
        """The scratch set of a check plan, ``pfw4-check`` (owned: a full plan destroys a leftover)."""
        return names.scratch_set_name(self.prefix, version)


DRIVER_SETS = SetNaming("pfw")      # IpsetFirewallDriver and IptcFirewallDriver


def member(cidr: str) -> str:
    """The spelling ``ipset save`` uses for a member of a canonical CIDR: host networks lose /32 or /128."""
    if cidr.endswith("/32"):
        return cidr[:-3] if ":" not in cidr else cidr
    if cidr.endswith("/128"):
        return cidr[:-4]
    return cidr


_HOST_PREFIX = {4: "/32", 6: "/128"}


def members(version: int, cidrs: Iterable[str]) -> set[str]:
    """``member`` of every canonical CIDR of one IP ``version`` (4 or 6), as a set: ``sets.group_members``'
    spelling of a whole group, with ``str.removesuffix`` mapped in C."""
    return set(map(str.removesuffix, cidrs, itertools.repeat(_HOST_PREFIX[version])))


# --------------------------------------------------------------------------- sizes

def capacity(entries: int, conf: cfg.ConfigOpts) -> int:
    """``maxelem`` for a set that must hold ``entries``: ``[sets] headroom`` so deltas rarely force a resize."""
    return max(conf.sets.min_set_size, math.ceil(entries * conf.sets.headroom))


def hash_size(set_capacity: int) -> int:
    """Initial bucket count: about two slots of capacity per bucket.

    Pre-sizing spares the kernel repeated rehashing while a restore fills the
    set (measured, 120k entries: 0.44 s with ipset's default 1024 buckets,
    0.31 s with 131072).  Buckets are pointers allocated on demand, so a
    generous size costs about 1 MB per 131072.
    """
    wanted = max(1024, set_capacity // 2)
    return 1 << (wanted - 1).bit_length()


def create_line(name: str, family: str, set_capacity: int) -> str:
    return (f"create {name} {SET_TYPE} family {family} hashsize {hash_size(set_capacity)} "
            f"maxelem {set_capacity}")


@dataclasses.dataclass(frozen=True, slots=True)
class SetSize:
    """What a delta needs to know of one live set: how many members it holds and how many fit."""

    members: int
    maxelem: int


@dataclasses.dataclass(frozen=True)
class SetsState:
    """The ipset and iptc drivers' state between calls: ``sizes`` per owned set name (read-only)."""

    sizes: Mapping[str, SetSize]


# --------------------------------------------------------------------------- reading the kernel

@dataclasses.dataclass
class KernelSet:
    """An owned set as ``ipset save`` reports it; members in ipset's spelling."""

    name: str
    type: str
    family: str
    maxelem: int
    members: set[str] = dataclasses.field(default_factory=set)


def _option(words: Sequence[str], key: str, default: str) -> str:
    # "create" options are "key value" pairs mixed with bare flags (counters, comment, ...): find keys by name.
    try:
        return words[words.index(key) + 1]
    except (ValueError, IndexError):
        return default


def parse_save(text: str, owns: Callable[[str], bool]) -> dict[str, KernelSet]:
    """The sets ``owns(name)`` accepts in ``ipset save`` output, with their members.

    ``ipset save`` prints each set's ``create`` line followed by all of its
    ``add`` lines, so the text splits into one block per set and a block's
    members come out of a comprehension per ``sets.YIELD_EVERY`` lines
    (120k members in 30-100 ms; ``sets.cooperate`` between them).
    """
    found: dict[str, KernelSet] = {}
    for block in ("\n" + text).split("\ncreate ")[1:]:
        header, _, body = block.partition("\n")
        words = header.split()
        name = words[0]
        if not owns(name):
            continue
        skip = len(f"add {name} ")
        # An element added with options ("... timeout 5") keeps only its address.
        lines, every = body.split("\n"), sets_mod.YIELD_EVERY
        members: set[str] = set()
        for start in range(0, len(lines), every):
            members.update([line[skip:] for line in lines[start:start + every] if line.startswith("add ")])
            sets_mod.cooperate()
        if any(" " in m for m in members):
            members = {m.split(" ", 1)[0] for m in members}
        members = sets_mod.canonical_members(members)
        found[name] = KernelSet(name, words[1] if len(words) > 1 else "", _option(words, "family", "inet"),
                                int(_option(words, "maxelem", str(DEFAULT_MAXELEM))), members)
    return found


def read_sets(runner: runner_mod.Runner, owns: Callable[[str], bool]) -> dict[str, KernelSet]:
    """``parse_save`` of ``ipset save``; raises ``ToolMissing`` when ipset is not installed."""
    return parse_save(runner(["ipset", "save"]), owns)


# --------------------------------------------------------------------------- planning

@dataclasses.dataclass(frozen=True)
class SetsPlan:
    """What one full plan does to a user's sets.

    ``creates`` are the ``destroy``/``create`` lines of the sets made anew
    (a leftover temporary, a set of the wrong type), ``fills`` the members
    of each set they create, ``after`` the swaps, the temporary sets'
    destroys and the in-place changes of live sets; ``restore`` is all of it
    as ONE ``ipset restore -exist`` input, in that order.  ``scratch`` the
    sets to destroy if it fails; ``obsolete`` owned sets to destroy once
    nothing references them; ``sizes`` every wanted set's size once it
    succeeded.
    """

    creates: tuple[str, ...]
    fills: Mapping[str, Collection[str]]
    after: tuple[str, ...]
    scratch: tuple[str, ...]
    obsolete: tuple[str, ...]
    sizes: Mapping[str, SetSize]

    @property
    def restore(self) -> tuple[str, ...]:
        fills = [line for name, members in self.fills.items() for line in map(f"add {name} ".__add__, members)]
        return (*self.creates, *fills, *self.after)

    def restore_steps(self, runner: runner_mod.Runner | None = None,
                      netlink: ipset_netlink.IpsetNetlink | None = None) -> tuple[base.Step, ...]:
        """The plan as one step: the restore, or, with a ``netlink`` client (and its ``runner``) and at least
        FILL_MIN members to fill, the creates and the rest by ``ipset restore`` and the fills as bulk netlink
        messages (``fill_step``)."""
        if not (self.creates or self.fills or self.after):
            return ()
        if netlink is not None and sum(map(len, self.fills.values())) >= FILL_MIN:
            return (fill_step(self, runner, netlink),)
        lines = self.restore
        # -exist: an in-place add that raced with another writer is not an error.
        return (base.Command(RESTORE, "\n".join(lines) + "\n", cleanup=self.cleanup(),
                             what=f"ipset restore ({len(lines)} lines; scratch {list(self.scratch)})"),)

    def cleanup(self) -> tuple[tuple[str, ...], ...]:
        return tuple(("ipset", "destroy", name) for name in self.scratch)

    def deletion_steps(self) -> tuple[base.Command, ...]:
        return destroy_steps(self.obsolete)


RESTORE = ("ipset", "restore", "-exist")


def destroy_steps(set_names: Iterable[str]) -> tuple[base.Command, ...]:
    return tuple(base.Command(("ipset", "destroy", name), what=f"ipset destroy {name}") for name in set_names)


def plan_sets(desired: Mapping[MatchKey, Collection[str]], kernel: Mapping[str, KernelSet], naming: SetNaming,
              conf: cfg.ConfigOpts) -> SetsPlan:
    """Pure: the changes that make the owned sets in ``kernel`` hold ``desired`` (members in ipset's spelling).

    ``kernel`` holds only sets ``naming`` owns.  See the module docstring
    for the choice per set.
    """
    creates: list[str] = []
    fills: dict[str, Collection[str]] = {}
    swap: list[str] = []
    in_place: list[str] = []
    scratch: list[str] = []
    sizes: dict[str, SetSize] = {}
    keep: set[str] = set()
    for key in sorted(desired):
        members = desired[key]
        if not isinstance(members, (set, frozenset)):
            members = set(members)
        name, temp = naming.name(key), naming.name(key, temporary=True)
        keep |= {name, temp}
        wanted = capacity(len(members), conf)
        if temp in kernel:
            # Left by an apply that died between create and destroy; never referenced.
            creates.append(f"destroy {temp}")
        live = kernel.get(name)
        if live is not None and (live.type != SET_TYPE or live.family != key.family):
            # swap refuses a different type or family.  Destroying works only if nothing
            # references the set; if a rule does, the restore fails loudly and nothing changes.
            LOG.warning("set %s is %s family %s, expected %s family %s: recreating it",
                        name, live.type, live.family, SET_TYPE, key.family)
            creates.append(f"destroy {name}")
            live = None
        if live is None:
            creates.append(create_line(name, key.family, wanted))
            fills[name] = members
            scratch.append(name)
            sizes[name] = SetSize(len(members), wanted)
            continue
        to_add, to_remove = sets_mod.diff_members(live.members, members)
        if not to_add and not to_remove:
            sizes[name] = SetSize(len(members), live.maxelem)
            continue
        if len(members) > live.maxelem or len(to_add) + len(to_remove) > conf.sets.full_rebuild_delta:
            creates.append(create_line(temp, key.family, wanted))
            fills[temp] = members
            scratch.append(temp)
            swap += [f"swap {temp} {name}", f"destroy {temp}"]
            sizes[name] = SetSize(len(members), wanted)
            continue
        in_place += _member_lines({name: to_add}, {name: to_remove},
                                  overflow=len(live.members) + len(to_add) > live.maxelem)
        sizes[name] = SetSize(len(members), live.maxelem)
    obsolete = tuple(name for name in sorted(kernel) if name not in keep)
    return SetsPlan(tuple(creates), base.frozen_mapping(fills), tuple(swap + in_place), tuple(scratch), obsolete,
                    base.frozen_mapping(sizes))


def _member_lines(adds: Mapping[str, Collection[str]], dels: Mapping[str, Collection[str]],
                  overflow: bool) -> list[str]:
    add_lines = [f"add {name} {m}" for name in sorted(adds) for m in sorted(adds[name])]
    del_lines = [f"del {name} {m}" for name in sorted(dels) for m in sorted(dels[name])]
    # Adds first keeps every wanted member in place throughout; when the adds alone
    # would pass a set's maxelem, removals (wanted gone anyway) go first.
    return del_lines + add_lines if overflow else add_lines + del_lines


def plan_members(adds: Mapping[str, Collection[str]], dels: Mapping[str, Collection[str]],
                 sizes: Mapping[str, SetSize]) -> tuple[base.Command, Mapping[str, SetSize]] | None:
    """A delta of existing sets' members as ONE ``ipset restore -exist``, and the sizes after it.

    ``adds``/``dels`` map set names to members (ipset's spelling); ``sizes``
    is the state of the previous call.  ``None`` when the change is
    structural - a set not in ``sizes`` (a new group), a set that would
    empty (its rule must go) or outgrow its ``maxelem`` - or empty.
    """
    after = dict(sizes)
    overflow = False
    for name in adds.keys() | dels.keys():
        old = sizes.get(name)
        if old is None:
            return None
        grown = len(adds.get(name, ()))
        count = old.members + grown - len(dels.get(name, ()))
        if count <= 0 or count > old.maxelem:
            return None
        overflow = overflow or old.members + grown > old.maxelem
        after[name] = SetSize(count, old.maxelem)
    lines = _member_lines(adds, dels, overflow)
    if not lines:
        return None
    # -exist: an add already present or a del already gone is drift, not an error; a full
    # plan (the periodic drift check) repairs it.
    step = base.Command(("ipset", "restore", "-exist"), "\n".join(lines) + "\n",
                        what=f"ipset restore ({len(lines)} member changes)")
    return step, base.frozen_mapping(after)


FILL_MIN = 1024    # a full plan filling fewer members keeps its one restore: one process either way


def netlink_for(runner: runner_mod.Runner) -> ipset_netlink.IpsetNetlink | None:
    """The netlink client for the namespace of ``runner``, or None for a runner that is not the real one (a
    test's fake dataplane interprets the ipset tool's input instead of a kernel)."""
    return ipset_netlink.IpsetNetlink(runner.netns) if isinstance(runner, runner_mod.Runner) else None


def member_step(step: base.Command, runner: runner_mod.Runner,
                netlink: ipset_netlink.IpsetNetlink | None) -> base.Step:
    """``plan_members``' restore as netlink messages (``ipset_netlink``): the same changes without a process.

    The restore itself where there is no netlink client; also, per call, when the netlink socket cannot be
    opened or used (logged).  A refusal of the kernel raises as the restore's would (``DriverError``).
    """
    if netlink is None or step.input is None:
        return step
    changes = ipset_netlink.parse_lines(step.input.splitlines())

    def write() -> bool:
        try:
            netlink.change(changes)
        except OSError as exc:
            LOG.warning("ipset over netlink failed (%s); running ipset restore instead", exc)
            runner(list(step.argv), input=step.input)
        return True

    return base.Call(write, f"{step.describe()} over netlink")


def fill_step(planned: SetsPlan, runner: runner_mod.Runner, netlink: ipset_netlink.IpsetNetlink) -> base.Call:
    """``planned`` with its fills over netlink: one ``ipset restore`` of the creates, each set's members as bulk
    messages (``IpsetNetlink.fill``), one restore of the rest - the restore's own order, so a set is created
    before it is filled and filled before it is swapped.

    The whole restore instead when the netlink socket cannot be had (logged; its creates and adds are
    idempotent under ``-exist``).  A failure anywhere runs the plan's cleanup (the scratch sets), as the
    restore's would.
    """
    def write() -> bool:
        if planned.creates:
            runner(list(RESTORE), input="\n".join(planned.creates) + "\n")
        try:
            for name, members in planned.fills.items():
                netlink.fill(name, members)
        except OSError as exc:
            LOG.warning("ipset over netlink failed (%s); running ipset restore instead", exc)
            runner(list(RESTORE), input="\n".join(planned.restore) + "\n")
            return True
        if planned.after:
            runner(list(RESTORE), input="\n".join(planned.after) + "\n")
        return True

    count = sum(map(len, planned.fills.values()))
    return base.Call(write, f"ipset restore ({len(planned.creates) + len(planned.after)} lines), {count} members "
                            f"over netlink (scratch {list(planned.scratch)})", cleanup=planned.cleanup())


def scratch_lines(name: str, family: str, members: Collection[str]) -> list[str]:
    """A check's scratch set: a leftover destroyed (``-exist`` accepts a missing one), created, filled."""
    return [f"destroy {name}", create_line(name, family, max(1024, len(members))),
            *(f"add {name} {m}" for m in members)]


# --------------------------------------------------------------------------- the driver

class IpsetFirewallDriver(base.PlannedFirewallDriver):
    """Provider rules as hash:net sets matched from nova-provider (see the module docstring)."""

    name = "ipset"
    naming = DRIVER_SETS

    def __init__(self, conf: cfg.ConfigOpts = provfw_conf.CONF, runner: runner_mod.Runner | None = None):
        super().__init__(conf, runner)
        self.layout = iptables.layout_from_conf(conf)
        self.tools = iptables.Tools.from_conf(conf)
        self.netlink = netlink_for(self.runner)

    # ------------------------------------------------------------ plans

    def plan_full(self, desired: Collection[RuleSpec]) -> base.Plan:
        sets_mod.check_capacity(len(desired), self.conf, self.name)
        groups = sets_mod.group_members(desired, members)
        planned = plan_sets(groups, read_sets(self.runner, self.naming.owns), self.naming, self.conf)
        return base.Plan(SetsState(planned.sizes), sets=planned.restore_steps(self.runner, self.netlink),
                         chains=self.chain_steps(groups.keys()), deletions=planned.deletion_steps())

    def plan_delta(self, added: Sequence[RuleSpec], removed: Sequence[RuleSpec], state: SetsState,
                   desired_count: int) -> base.Plan | None:
        planned = plan_members(self._by_set(added), self._by_set(removed), state.sizes)
        if planned is None:
            return None
        step, sizes = planned
        return base.Plan(SetsState(sizes), sets=(member_step(step, self.runner, self.netlink),), mode="delta")

    def plan_check(self, specs: Collection[RuleSpec]) -> base.Plan:
        sets_mod.check_capacity(len(specs), self.conf, self.name)
        groups = sets_mod.group_members(specs, members)
        versions = sorted({key.version for key in groups})
        scratch = {version: self.naming.scratch(version) for version in versions}
        lines: list[str] = []
        for version in versions:
            wanted = set().union(*(m for key, m in groups.items() if key.version == version))
            lines += scratch_lines(scratch[version], "inet" if version == 4 else "inet6", wanted)
        cleanup = tuple(("ipset", "destroy", name) for name in scratch.values())
        fill = (base.Command(("ipset", "restore", "-exist"), "\n".join(lines) + "\n", cleanup=cleanup,
                             what=f"ipset restore of scratch sets {sorted(scratch.values())}"),) if lines else ()
        return base.Plan(None, sets=fill, chains=self.check_chain_steps(groups.keys(), scratch, cleanup),
                         deletions=destroy_steps(scratch.values()), mode="check")

    def _by_set(self, specs: Iterable[RuleSpec]) -> dict[str, set[str]]:
        return {self.naming.name(key): spelt for key, spelt in sets_mod.group_members(specs, members).items()}

    # ------------------------------------------------------------ the chain step (iptc replaces it)

    def chain_steps(self, keys: Iterable[MatchKey]) -> tuple[base.Step, ...]:
        """Writes that bring nova-provider (both families) to one rule per group; () when it matches."""
        keys = list(keys)
        wanted = {v: iptables.desired_set_chain(keys, v, self.layout, self.naming.name) for v in (4, 6)}
        return iptables.chain_steps(iptables.read_tables(self.runner, self.tools), wanted, self.layout, self.tools)

    def check_chain_steps(self, keys: Iterable[MatchKey], scratch: Mapping[int, str],
                          cleanup: tuple[tuple[str, ...], ...]) -> tuple[base.Step, ...]:
        """``iptables-restore --test`` of the group rules, matching the scratch sets (which must exist)."""
        steps = []
        for version, set_name in sorted(scratch.items()):
            rules = [iptables.set_drop_rule(names.CHECK_CHAIN, key, set_name)
                     for key in sorted(keys) if key.version == version]
            steps.append(base.Command(self.tools.restore(version, test=True), iptables.check_transaction(rules),
                                      cleanup=cleanup, what=f"{self.tools.program(version, 'restore')} --test"))
        return tuple(steps)

    def removal_steps(self) -> tuple[base.Step, ...]:
        return iptables.removal_steps(iptables.read_tables(self.runner, self.tools), self.layout, self.tools)

    # ------------------------------------------------------------ teardown

    def teardown(self) -> None:
        """Remove the jump and the chain, then every owned set; DriverError naming any set left behind."""
        with self.applying():
            owned = sorted(read_sets(self.runner, self.naming.owns))
            base.execute(base.Plan(None, chains=self.removal_steps(), deletions=destroy_steps(owned)), self.runner)
            left = sorted(read_sets(self.runner, self.naming.owns))
            if self.netlink is not None:
                self.netlink.close()
        if left:
            raise exception.DriverError(f"{self.name}: teardown could not destroy set(s) {left} (still referenced?)")
