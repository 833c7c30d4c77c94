"""A fake set dataplane that INTERPRETS ipset, nft and iptables input (tests: tests/unit/test_fake_sets.py).

``FakeSetDataplane`` is a ``Runner`` stand-in for the set-based drivers:

* ``ipset`` (``save``, ``list -n``, ``restore [-exist]``, ``create``, ``add``,
  ``del``, ``swap``, ``destroy``, ``flush``): a restore runs line by line and
  stops at the first bad line, leaving earlier lines applied - as the real
  ``ipset restore``, which is NOT atomic.  With ``-exist`` a ``destroy`` of a
  missing set succeeds, as the real tool's does.  ``maxelem`` is enforced ("Hash is
  full"), swaps need the same type and family, a set referenced by an
  iptables rule cannot be destroyed.  Host members are stored as ipset
  prints them (no /32).  ``watch(set, member)`` records every moment a
  watched member is missing from a set that a rule references - a window
  through which a blocked packet would pass.
* ``ip[6]tables*`` via ``FakeIptables`` extended with ``-m set --match-set
  NAME src``: a rule naming a missing set fails the whole restore.
* ``nft`` (``-j list tables``, ``-j list table``, ``-f -``, ``-c -f -``,
  ``delete table``, ``add element``, ``delete element``): an ``nft -f``
  script is ONE transaction applied to a copy; any error discards it, and
  ``-c`` (check mode) discards it in any case.  Sets referenced by rules cannot be deleted,
  ``delete element`` of a missing element fails, a rule may only reference
  existing sets, elements must belong to the set's family.
* any other program raises ``ToolMissing``, as the real Runner does.
* ``drops(src, proto, dport)`` evaluates the state as the kernel would for a
  forwarded packet (nft chain and iptables FORWARD -> nova-provider).
"""

from __future__ import annotations

import copy
import dataclasses
import ipaddress
import json
import re
import shlex
from typing import Sequence

from provfw import exception, runner as runner_mod
from tests.lib.fake_iptables import FakeIptables, RestoreFailed


class CommandFailed(Exception):
    pass


# --------------------------------------------------------------------------- ipset

@dataclasses.dataclass
class FakeIpsetSet:
    type: str
    family: str
    maxelem: int
    hashsize: int
    members: set[str] = dataclasses.field(default_factory=set)


def _ipset_member(text: str, family: str) -> str:
    try:
        if "%" in text:          # Python takes an IPv6 scope; ipset 7.17 cannot parse one
            raise ValueError(text)
        network = ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise CommandFailed(f"Syntax error: '{text}' is not a valid address") from None
    if (network.version == 4) != (family == "inet"):
        raise CommandFailed(f"Syntax error: '{text}' does not match the set's family {family}")
    if network.prefixlen == 0:
        raise CommandFailed("The value of the CIDR parameter of the IP address is invalid")
    if network.prefixlen == network.max_prefixlen:
        return str(network.network_address)
    return network.with_prefixlen


class FakeIpset:
    def __init__(self, references):
        self.sets: dict[str, FakeIpsetSet] = {}
        self._references = references
        self._watched: list[tuple[str, str]] = []
        self.windows: list[str] = []

    def watch(self, name: str, member: str) -> None:
        self._watched.append((name, member))

    def _check_watch(self, after: str) -> None:
        for name, member in self._watched:
            if self._references(name) and member not in self.sets.get(name, FakeIpsetSet("", "", 0, 0)).members:
                self.windows.append(f"{member} missing from referenced set {name} after '{after}'")

    def run(self, args: list[str], stdin: str | None) -> str:
        exist = "-exist" in args
        args = [a for a in args if a not in ("-exist", "-!")]
        if not args:
            raise CommandFailed("no command")
        if args[0] == "save":
            return self._save(args[1:])
        if args[0] == "list" and args[1:] == ["-n"]:
            return "".join(f"{n}\n" for n in self.sets)
        if args[0] == "restore":
            for number, line in enumerate((stdin or "").splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    self._command(shlex.split(line), exist)
                except CommandFailed as exc:
                    raise CommandFailed(f"Error in line {number}: {exc}") from None
                self._check_watch(line)
            return ""
        self._command(args, exist)
        self._check_watch(" ".join(args))
        return ""

    def _save(self, names: list[str]) -> str:
        out = []
        for name, found in self.sets.items():
            if names and name not in names:
                continue
            out.append(f"create {name} {found.type} family {found.family} hashsize {found.hashsize} "
                       f"maxelem {found.maxelem} bucketsize 12 initval 0x1234")
            out.extend(f"add {name} {m}" for m in found.members)
        return "\n".join(out) + ("\n" if out else "")

    def _get(self, name: str) -> FakeIpsetSet:
        if name not in self.sets:
            raise CommandFailed(f"The set with the given name does not exist: {name}")
        return self.sets[name]

    def _command(self, words: list[str], exist: bool) -> None:
        op = words[0]
        if op == "create":
            name, kind = words[1], words[2]
            options = dict(zip(words[3::2], words[4::2]))
            new = FakeIpsetSet(kind, options.get("family", "inet"), int(options.get("maxelem", 65536)),
                               int(options.get("hashsize", 1024)))
            if kind != "hash:net":
                raise CommandFailed(f"FakeIpset knows only hash:net, not {kind}")
            if name in self.sets:
                old = self.sets[name]
                if exist and (old.type, old.family, old.maxelem) == (new.type, new.family, new.maxelem):
                    return
                raise CommandFailed(f"Set cannot be created: set with the same name already exists: {name}")
            self.sets[name] = new
        elif op in ("add", "del"):
            found = self._get(words[1])
            member = _ipset_member(words[2], found.family)
            if op == "add":
                if member in found.members:
                    if exist:
                        return
                    raise CommandFailed("Element cannot be added to the set: it's already added")
                if len(found.members) >= found.maxelem:
                    raise CommandFailed("Hash is full, cannot add more elements")
                found.members.add(member)
            else:
                if member not in found.members:
                    if exist:
                        return
                    raise CommandFailed("Element cannot be deleted from the set: it's not added")
                found.members.discard(member)
        elif op == "swap":
            first, second = self._get(words[1]), self._get(words[2])
            if (first.type, first.family) != (second.type, second.family):
                raise CommandFailed("The sets cannot be swapped: their type does not match")
            self.sets[words[1]], self.sets[words[2]] = second, first
        elif op == "destroy":
            names = [words[1]] if len(words) > 1 else list(self.sets)
            for name in names:
                if exist and name not in self.sets:
                    continue
                self._get(name)
                if self._references(name):
                    raise CommandFailed("Set cannot be destroyed: it is in use by a kernel component")
                del self.sets[name]
        elif op == "flush":
            self._get(words[1]).members.clear()
        else:
            raise CommandFailed(f"unknown ipset command {op}")


class SetAwareIptables(FakeIptables):
    """FakeIptables that also accepts ``-m set --match-set NAME src`` for sets that exist."""

    def __init__(self, ipset_sets: dict):
        super().__init__()
        self._ipset_sets = ipset_sets

    def _canonical_rule(self, version, work, tokens):
        tokens = list(tokens)
        set_part = ""
        for i in range(len(tokens) - 3):
            if tokens[i:i + 3] == ["-m", "set", "--match-set"]:
                name, direction = tokens[i + 3], tokens[i + 4]
                if name not in self._ipset_sets:
                    raise RestoreFailed(f"Set {name} doesn't exist.")
                if direction != "src":
                    raise RestoreFailed("provfw only matches sources")
                set_part = f"-m set --match-set {name} src"
                del tokens[i:i + 5]
                break
        rule = super()._canonical_rule(version, work, tokens)
        return f"{set_part} {rule}".strip() if set_part else rule

    def set_references(self, name: str) -> int:
        needle = f"--match-set {name} "
        return sum(1 for tables in self._tables.values() for table in tables.values()
                   for chain in table.chains.values() for rule in chain.rules if needle in rule)


# --------------------------------------------------------------------------- nft

_STMT = re.compile(r"^(add|flush|delete) (table|chain|set|element|rule) (\w+) (\S+)\s*(.*)$")


class FakeNft:
    def __init__(self):
        self.tables: dict[tuple[str, str], dict] = {}
        self.transactions = 0
        self.checks = 0

    def run(self, args: list[str], stdin: str | None) -> str:
        if args == ["-j", "list", "tables"]:
            items = [{"metainfo": {"version": "1.0.6", "json_schema_version": 1}}]
            items += [{"table": {"family": family, "name": name, "handle": 1}} for family, name in self.tables]
            return json.dumps({"nftables": items})
        if args[:2] == ["-j", "list"] and args[2] == "table":
            return self._list(args[3], args[4])
        if args in (["-f", "-"], ["-c", "-f", "-"]):
            work = copy.deepcopy(self.tables)
            for number, line in enumerate((stdin or "").splitlines(), 1):
                if line.strip():
                    try:
                        self._statement(work, line.strip())
                    except CommandFailed as exc:
                        raise CommandFailed(f"<stdin>:{number}:1-10: Error: {exc}") from None
            if args[0] == "-c":
                self.checks += 1
                return ""
            self.tables = work
            self.transactions += 1
            return ""
        # single commands (drift made by another program)
        work = copy.deepcopy(self.tables)
        self._statement(work, " ".join(args))
        self.tables = work
        return ""

    def _list(self, family: str, name: str) -> str:
        table = self.tables.get((family, name))
        if table is None:
            raise CommandFailed("Error: No such file or directory; did you mean table 'filter' in family ip?")
        items: list[dict] = [{"metainfo": {"version": "1.0.6", "json_schema_version": 1}},
                             {"table": {"family": family, "name": name, "handle": 1}}]
        for set_name, found in table["sets"].items():
            entry = {"family": family, "name": set_name, "table": name, "type": found["type"], "handle": 2}
            if found["flags"]:
                entry["flags"] = list(found["flags"])
            if found["elements"]:
                entry["elem"] = sorted(found["elements"])
            items.append({"set": entry})
        for chain_name, chain in table["chains"].items():
            items.append({"chain": {"family": family, "table": name, "name": chain_name, "handle": 3,
                                    **chain["spec"]}})
            for number, (text, comment) in enumerate(chain["rules"]):
                rule = {"family": family, "table": name, "chain": chain_name, "handle": 10 + number, "expr": text}
                if comment:
                    rule["comment"] = comment
                items.append({"rule": rule})
        return json.dumps({"nftables": items})

    @staticmethod
    def _table(work: dict, family: str, name: str) -> dict:
        if (family, name) not in work:
            raise CommandFailed(f"Could not process rule: No such file or directory (table {name})")
        return work[(family, name)]

    def _statement(self, work: dict, line: str) -> None:
        match = _STMT.match(line)
        if not match:
            raise CommandFailed(f"syntax error, unexpected '{line[:30]}'")
        verb, kind, family, table_name, rest = match.groups()
        if family != "inet":
            raise CommandFailed("FakeNft knows only the inet family")
        if kind == "table":
            if verb == "add":
                work.setdefault((family, table_name), {"sets": {}, "chains": {}})
            elif verb == "delete":
                self._table(work, family, table_name)
                del work[(family, table_name)]
            else:
                for chain in self._table(work, family, table_name)["chains"].values():
                    chain["rules"].clear()
            return
        table = self._table(work, family, table_name)
        name, _, rest = rest.partition(" ")
        if kind == "chain":
            self._chain(table, verb, name, rest)
        elif kind == "set":
            self._set(table, verb, name, rest)
        elif kind == "element":
            self._element(table, verb, name, rest)
        else:
            if verb != "add":
                raise CommandFailed("rules are only added by provfw")
            self._rule(table, name, rest)

    @staticmethod
    def _chain(table: dict, verb: str, name: str, rest: str) -> None:
        if verb == "add":
            spec = {}
            found = re.search(r"type (\w+) hook (\w+) priority (-?\d+); policy (\w+);", rest)
            if found:
                spec = {"type": found[1], "hook": found[2], "prio": int(found[3]), "policy": found[4]}
            elif rest.strip():
                raise CommandFailed(f"bad chain spec {rest}")
            if name in table["chains"]:
                if spec and table["chains"][name]["spec"] != spec:
                    raise CommandFailed("Could not process rule: Device or resource busy (chain spec differs)")
                return
            table["chains"][name] = {"spec": spec, "rules": []}
            return
        if name not in table["chains"]:
            raise CommandFailed(f"Could not process rule: No such file or directory (chain {name})")
        if verb == "flush":
            table["chains"][name]["rules"].clear()
        else:
            if table["chains"][name]["rules"]:
                raise CommandFailed("Could not process rule: Device or resource busy (chain not empty)")
            del table["chains"][name]

    @staticmethod
    def _references(table: dict, name: str) -> int:
        return sum(1 for chain in table["chains"].values() for text, _ in chain["rules"]
                   if re.search(rf"@{re.escape(name)}(\s|$)", text))

    def _set(self, table: dict, verb: str, name: str, rest: str) -> None:
        if verb == "add":
            found = re.search(r"type (ipv4_addr|ipv6_addr);(?: flags (\w+);)?", rest)
            if not found:
                raise CommandFailed(f"bad set spec {rest}")
            spec = {"type": found[1], "flags": (found[2],) if found[2] else (), "elements": set()}
            if name in table["sets"]:
                old = table["sets"][name]
                if (old["type"], old["flags"]) != (spec["type"], spec["flags"]):
                    raise CommandFailed("Could not process rule: File exists (set spec differs)")
                return
            table["sets"][name] = spec
            return
        if name not in table["sets"]:
            raise CommandFailed(f"Could not process rule: No such file or directory (set {name})")
        if verb == "flush":
            table["sets"][name]["elements"].clear()
        else:
            if self._references(table, name):
                raise CommandFailed("Could not process rule: Device or resource busy (set in use)")
            del table["sets"][name]

    @staticmethod
    def _element(table: dict, verb: str, name: str, rest: str) -> None:
        if name not in table["sets"]:
            raise CommandFailed(f"Could not process rule: No such file or directory (set {name})")
        found = table["sets"][name]
        body = rest.strip()
        if not (body.startswith("{") and body.endswith("}")):
            raise CommandFailed("syntax error in element list")
        version = 4 if found["type"] == "ipv4_addr" else 6
        for item in (x.strip() for x in body[1:-1].split(",")):
            if "%" in item:      # Python takes an IPv6 scope; nft 1.0.6 does not
                raise CommandFailed("syntax error, unexpected junk, expecting comma or '}'")
            try:
                address = ipaddress.ip_address(item)
            except ValueError:
                raise CommandFailed(f"Could not resolve hostname: {item}") from None
            if address.version != version:
                raise CommandFailed(f"datatype mismatch: {item} in {found['type']} set")
            if verb == "add":
                found["elements"].add(str(address))
            elif verb == "delete":
                if str(address) not in found["elements"]:
                    raise CommandFailed(f"Could not process rule: No such file or directory ({item})")
                found["elements"].discard(str(address))
            else:
                raise CommandFailed("bad element verb")

    @staticmethod
    def _rule(table: dict, chain: str, rest: str) -> None:
        if chain not in table["chains"]:
            raise CommandFailed(f"Could not process rule: No such file or directory (chain {chain})")
        for ref in re.findall(r"@(\S+)", rest):
            if ref not in table["sets"]:
                raise CommandFailed(f"Could not process rule: No such file or directory (set {ref})")
        comment = re.search(r'comment "([^"]*)"', rest)
        table["chains"][chain]["rules"].append((rest, comment[1] if comment else ""))


# --------------------------------------------------------------------------- the Runner stand-in

@dataclasses.dataclass(frozen=True)
class Ran:
    cmd: tuple[str, ...]
    input: str | None
    ok: bool


class FakeSetDataplane:
    """Runner-compatible: dispatches ipset / nft / iptables to the fakes above."""

    def __init__(self):
        self.netns = ""
        self.calls: list[Ran] = []
        self.iptables = SetAwareIptables({})
        self.ipset = FakeIpset(self.iptables.set_references)
        self.iptables._ipset_sets = self.ipset.sets
        self.nft = FakeNft()
        self._fail: list[tuple[str, str]] = []

    def wrap(self, cmd: Sequence[str]) -> list[str]:
        return list(cmd)

    def __call__(self, cmd: Sequence[str], input: str | None = None, check: bool = True) -> str:
        return self.execute(cmd, input=input, check=check)

    def fail_next(self, tool: str, reason: str) -> None:
        """Make the next command of ``tool`` fail before it changes anything."""
        self._fail.append((tool, reason))

    def execute(self, cmd: Sequence[str], input: str | None = None, check: bool = True) -> str:
        cmd = tuple(cmd)
        if cmd[0].startswith(("iptables", "ip6tables")):
            self.calls.append(Ran(cmd, input, True))
            return self.iptables.execute(cmd, input=input, check=check)
        try:
            for tool, reason in list(self._fail):
                if tool == cmd[0]:
                    self._fail.remove((tool, reason))
                    raise CommandFailed(reason)
            if cmd[0] == "ipset":
                out = self.ipset.run(list(cmd[1:]), input)
            elif cmd[0] == "nft":
                out = self.nft.run(list(cmd[1:]), input)
            else:
                self.calls.append(Ran(cmd, input, False))
                raise exception.ToolMissing(cmd, 127, stderr=f"{cmd[0]}: command not found (FakeSetDataplane)")
        except CommandFailed as exc:
            self.calls.append(Ran(cmd, input, False))
            if check:
                stderr = f"{cmd[0]}: {exc}\n"
                raise exception.ProcessExecutionError(
                    cmd, 1, "", stderr, detail=runner_mod.failing_input_context(stderr, input)) from None
            return ""
        self.calls.append(Ran(cmd, input, True))
        return out

    # ------------------------------------------------------------ helpers for tests

    def commands(self, tool: str) -> list[Ran]:
        return [c for c in self.calls if c.cmd[0].startswith(tool)]

    def reset_calls(self) -> None:
        self.calls.clear()
        self.iptables.calls.clear()

    def writes(self) -> list[Ran]:
        """Commands that may change state (every nft -f / ipset restore/destroy / iptables restore)."""
        reads = (("ipset", "save"), ("ipset", "list"), ("nft", "-j"), ("nft", "-c"))
        return [c for c in self.calls if c.cmd[:2] not in reads and not c.cmd[0].endswith("-save")]

    def drops(self, src: str, protocol: str = "tcp", dport: int = 80, icmp_type: int = 8, icmp_code: int = 0) -> bool:
        """Would a forwarded packet from ``src`` be dropped by nft or by FORWARD -> nova-provider?"""
        return (self._nft_drops(src, protocol, dport, icmp_type, icmp_code)
                or self._iptables_drops(src, protocol, dport, icmp_type, icmp_code))

    def _nft_drops(self, src, protocol, dport, icmp_type, icmp_code) -> bool:
        address = ipaddress.ip_address(src)
        for (family, _), table in self.nft.tables.items():
            for chain in table["chains"].values():
                if chain["spec"].get("hook") != "forward":
                    continue
                for text, _ in chain["rules"]:
                    if _nft_rule_matches(text, table, address, protocol, dport, icmp_type, icmp_code):
                        return True
        return False

    def _iptables_drops(self, src, protocol, dport, icmp_type, icmp_code) -> bool:
        address = ipaddress.ip_address(src)
        rules = self.iptables.rules("FORWARD", address.version)
        if not rules or "-j nova-provider" not in rules[0]:
            return False
        for rule in self.iptables.rules("nova-provider", address.version):
            if "-j DROP" not in rule:
                continue
            name = re.search(r"--match-set (\S+) src", rule)
            if not name or name[1] not in self.ipset.sets:
                continue
            members = self.ipset.sets[name[1]].members
            if not any(address in ipaddress.ip_network(m) for m in members):
                continue
            proto = re.search(r"-p (\S+)", rule)
            wanted = {"icmp": "icmp" if address.version == 4 else "ipv6-icmp"}.get(protocol, protocol)
            if proto and proto[1] != wanted:
                continue
            ports = re.search(r"--dports? (\S+)", rule)
            if ports:
                low, _, high = ports[1].partition(":")
                if not int(low) <= dport <= int(high or low):
                    continue
            icmp = re.search(r"--icmp(?:v6)?-type (\S+)", rule)
            if icmp:
                kind, _, code = icmp[1].partition("/")
                if int(kind) != icmp_type or (code and int(code) != icmp_code):
                    continue
            return True
        return False


def _nft_rule_matches(text, table, address, protocol, dport, icmp_type, icmp_code) -> bool:
    found = re.match(r"(ip6?) saddr(?: & (\S+))? @(\S+)\s*(.*?)\s*drop", text)
    if not found:
        return False
    family, mask, set_name, rest = found.groups()
    if (family == "ip") != (address.version == 4):
        return False
    key = address
    if mask:
        key = ipaddress.ip_address(int(address) & int(ipaddress.ip_address(mask)))
    if str(key) not in table["sets"][set_name]["elements"]:
        return False
    if rest.startswith(("tcp dport", "udp dport")):
        words = rest.split()
        proto, ports = words[0], words[2]
        low, _, high = ports.partition("-")
        return protocol == proto and int(low) <= dport <= int(high or low)
    if rest.startswith("meta l4proto"):
        return protocol == "icmp"
    if rest.startswith(("icmp type", "icmpv6 type")):
        words = rest.split()
        if protocol != "icmp" or int(words[2]) != icmp_type:
            return False
        return len(words) < 6 or int(words[5]) == icmp_code
    return rest == ""
