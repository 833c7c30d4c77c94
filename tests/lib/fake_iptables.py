"""A fake iptables dataplane for unit tests: it INTERPRETS what it is given.

``FakeIptables`` stands in for ``provfw.runner.Runner`` (same call
signature) and answers the commands an iptables-based driver runs:

* ``ip[6]tables[-nft|-legacy]-save [-t TABLE]`` prints the tables the way
  iptables-save does (built-in chains first, then user chains sorted, rules
  chain by chain, comments in double quotes, ``-s`` always with a prefix);
* ``ip[6]tables[-nft|-legacy]-restore [--noflush] [--wait N]`` parses the
  input line by line and applies it as iptables-restore does:

  - ``*table`` opens a transaction on a copy of the table; nothing is visible
    until its ``COMMIT``; a bad line (unknown chain, bad address, rule number
    out of range, jump to a missing chain, unknown option, missing COMMIT)
    aborts the transaction with ``line N failed`` and exit status 1, leaving
    the table exactly as it was;
  - a chain declaration ``:name - [0:0]`` creates a missing user chain and,
    under ``--noflush``, FLUSHES an existing one (the trap the driver must
    avoid for nova-local); without ``--noflush`` the whole table is flushed
    first;
  - ``-A``, ``-I [n]``, ``-D n`` / ``-D rulespec``, ``-R``, ``-F``, ``-N``,
    ``-X`` (refused for built-in, non-empty or referenced chains), ``-P``;
* ``ip[6]tables[-nft|-legacy] [-t TABLE] [-w N] <one command>`` runs a single
  command, as another program on the host would (used by tests to cause drift).

Rules are validated as far as provfw and the tests use iptables: addresses
must belong to the family, ports and ICMP types must be in range, a match
must fit its protocol (``-m icmp`` only in IPv4 with ``-p icmp``, ``-m icmp6``
only in IPv6 with ``-p ipv6-icmp``), comments are at most 256 characters.

Each (family, flavour) pair has its own tables, as the kernel keeps legacy
and nft rules apart.  ``calls`` records every command with its input so
tests can assert what was (not) written; ``fail_next_restore`` makes the
next restore fail as if the kernel or the xtables lock refused it.

Thread-safety: every command runs under one lock, like the xtables lock.
"""

from __future__ import annotations

import copy
import dataclasses
import ipaddress
import re
import shlex
import threading
from typing import Sequence

from provfw import exception, runner as runner_mod

BUILTIN_CHAINS = {
    "filter": ("INPUT", "FORWARD", "OUTPUT"),
    "nat": ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"),
    "mangle": ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"),
    "raw": ("PREROUTING", "OUTPUT"),
}
STANDARD_TARGETS = frozenset({"ACCEPT", "DROP", "RETURN", "REJECT", "LOG", "QUEUE"})
CHAIN_NAME_MAX = 28          # the kernel's XT_EXTENSION_MAXNAMELEN - 1
COMMENT_MAX = 255
MULTIPORT_MAX = 15
_TOOL_RE = re.compile(r"^(ip6?tables)(?:-(nft|legacy))?(?:-(save|restore))?$")


class RestoreFailed(Exception):
    """One line of restore input was refused; the transaction is discarded."""

    def __init__(self, reason: str, line: int = 0):
        self.reason = reason
        self.line = line
        super().__init__(reason)


@dataclasses.dataclass
class Chain:
    name: str
    policy: str | None = None          # built-in chains only
    rules: list[str] = dataclasses.field(default_factory=list)  # canonical rule text after "-A <chain> "

    @property
    def builtin(self) -> bool:
        return self.policy is not None


@dataclasses.dataclass
class Table:
    name: str
    chains: dict[str, Chain]

    @classmethod
    def fresh(cls, name: str) -> "Table":
        if name not in BUILTIN_CHAINS:
            raise RestoreFailed(f"table '{name}' does not exist")
        return cls(name, {c: Chain(c, "ACCEPT") for c in BUILTIN_CHAINS[name]})

    def chain(self, name: str) -> Chain:
        try:
            return self.chains[name]
        except KeyError:
            raise RestoreFailed(f"chain '{name}' does not exist") from None

    def references(self, name: str) -> int:
        return sum(1 for c in self.chains.values() for r in c.rules if _target_of(r) == name)


@dataclasses.dataclass(frozen=True)
class Call:
    """One command the fake ran."""

    cmd: tuple[str, ...]
    input: str | None
    returncode: int
    version: int
    flavour: str
    action: str                          # "save", "restore" or "command"


def _target_of(rule: str) -> str | None:
    tokens = shlex.split(rule)
    for i, tok in enumerate(tokens[:-1]):
        if tok in ("-j", "--jump", "-g", "--goto"):
            return tokens[i + 1]
    return None


class FakeIptables:
    """A Runner-compatible fake of the iptables tools (see the module docstring)."""

    def __init__(self, netns: str = ""):
        self.netns = netns
        self.calls: list[Call] = []
        self._tables: dict[tuple[int, str], dict[str, Table]] = {}
        self._lock = threading.Lock()
        self._failures: list[tuple[int | None, str]] = []

    # ------------------------------------------------------------------ Runner API

    def wrap(self, cmd: Sequence[str]) -> list[str]:
        return list(cmd)

    def __call__(self, cmd: Sequence[str], input: str | None = None, check: bool = True) -> str:
        return self.execute(cmd, input=input, check=check)

    def execute(self, cmd: Sequence[str], input: str | None = None, check: bool = True) -> str:
        cmd = tuple(cmd)
        match = _TOOL_RE.match(cmd[0]) if cmd else None
        if not match:
            raise exception.ToolMissing(cmd, 127, stderr=f"{cmd[0] if cmd else ''}: command not found "
                                                         "(FakeIptables only knows iptables tools)")
        version = 6 if match.group(1) == "ip6tables" else 4
        flavour = match.group(2) or "nft"
        action = match.group(3) or "command"
        tool = f"{match.group(1)}-{action}" if action != "command" else match.group(1)
        with self._lock:
            try:
                if action == "save":
                    out = self._save_cmd(version, flavour, cmd[1:])
                elif action == "restore":
                    out = self._restore_cmd(version, flavour, cmd[1:], input or "")
                else:
                    out = self._single_cmd(version, flavour, cmd[1:])
            except RestoreFailed as failure:
                where = f"line {failure.line} failed: " if failure.line else ""
                stderr = f"{tool}: {where}{failure.reason}\n"
                self.calls.append(Call(cmd, input, 1, version, flavour, action))
                if check:
                    raise exception.ProcessExecutionError(
                        cmd, 1, "", stderr, detail=runner_mod.failing_input_context(stderr, input)) from None
                return ""
            self.calls.append(Call(cmd, input, 0, version, flavour, action))
            return out

    # ------------------------------------------------------------------ helpers for tests

    def restores(self, version: int | None = None) -> list[Call]:
        """Every restore run so far (successful or not), optionally for one family."""
        return [c for c in self.calls if c.action == "restore" and (version is None or c.version == version)]

    def writes(self) -> list[Call]:
        """Every command that could have changed state (restores and single commands)."""
        return [c for c in self.calls if c.action != "save"]

    def rules(self, chain: str, version: int = 4, table: str = "filter", flavour: str = "nft") -> list[str]:
        """``chain``'s rules as iptables-save prints them ("-A chain ..."); [] if the chain is absent."""
        found = self._state(version, flavour).get(table)
        if found is None or chain not in found.chains:
            return []
        return [f"-A {chain} {rule}" for rule in found.chains[chain].rules]

    def has_chain(self, chain: str, version: int = 4, table: str = "filter", flavour: str = "nft") -> bool:
        found = self._state(version, flavour).get(table)
        return found is not None and chain in found.chains

    def save(self, version: int = 4, table: str | None = "filter", flavour: str = "nft") -> str:
        with self._lock:
            return self._render(version, flavour, table)

    def run(self, version: int, line: str, table: str = "filter", flavour: str = "nft") -> None:
        """Run one command as another program on the host would (``-F nova-provider``, ...)."""
        tool = "iptables" if version == 4 else "ip6tables"
        self.execute([f"{tool}-{flavour}" if flavour != "nft" else tool, "-t", table, *shlex.split(line)])

    def fail_next_restore(self, reason: str = "Another app is currently holding the xtables lock.",
                          version: int | None = None) -> None:
        """Make the next restore (of ``version``, or of either family) fail before changing anything."""
        with self._lock:
            self._failures.append((version, reason))

    # ------------------------------------------------------------------ commands

    def _state(self, version: int, flavour: str) -> dict[str, Table]:
        return self._tables.setdefault((version, flavour), {"filter": Table.fresh("filter")})

    def _save_cmd(self, version: int, flavour: str, args: Sequence[str]) -> str:
        table = None
        it = iter(args)
        for arg in it:
            if arg in ("-t", "--table"):
                table = next(it, None)
                if table is None:
                    raise RestoreFailed("option -t requires an argument")
            elif arg in ("-c", "--counters"):
                continue
            else:
                raise RestoreFailed(f"unknown argument '{arg}'")
        if table is not None and table not in BUILTIN_CHAINS:
            raise RestoreFailed(f"table '{table}' does not exist")
        return self._render(version, flavour, table)

    def _render(self, version: int, flavour: str, only: str | None) -> str:
        tool = "iptables-save" if version == 4 else "ip6tables-save"
        out = []
        for name, table in sorted(self._state(version, flavour).items()):
            if only is not None and name != only:
                continue
            out.append(f"# Generated by {tool} (FakeIptables, {flavour})")
            out.append(f"*{name}")
            builtins = [c for c in BUILTIN_CHAINS[name] if c in table.chains]
            users = sorted(c for c in table.chains if c not in BUILTIN_CHAINS[name])
            for chain_name in builtins + users:
                chain = table.chains[chain_name]
                out.append(f":{chain_name} {chain.policy or '-'} [0:0]")
            for chain_name in builtins + users:
                out.extend(f"-A {chain_name} {rule}" for rule in table.chains[chain_name].rules)
            out.append("COMMIT")
            out.append(f"# Completed by {tool}")
        return "\n".join(out) + ("\n" if out else "")

    def _restore_cmd(self, version: int, flavour: str, args: Sequence[str], text: str) -> str:
        noflush = test_only = False
        it = iter(args)
        for arg in it:
            if arg in ("-n", "--noflush"):
                noflush = True
            elif arg in ("-w", "--wait"):
                value = next(it, None)
                if value is None or not value.isdigit():
                    raise RestoreFailed("--wait needs a number of seconds")
            elif arg in ("-t", "--test"):
                test_only = True
            else:
                raise RestoreFailed(f"unknown argument '{arg}'")
        for index, (only, reason) in enumerate(self._failures):
            if only in (None, version):
                del self._failures[index]
                raise RestoreFailed(reason)
        state = self._state(version, flavour)
        committed = self._parse_restore(version, state, text, noflush)
        if not test_only:
            state.update(committed)
        return ""

    def _single_cmd(self, version: int, flavour: str, args: Sequence[str]) -> str:
        args = list(args)
        table = "filter"
        rest: list[str] = []
        i = 0
        while i < len(args):
            if args[i] in ("-t", "--table"):
                table = args[i + 1]
                i += 2
            elif args[i] in ("-w", "--wait"):
                i += 2 if i + 1 < len(args) and args[i + 1].isdigit() else 1
            else:
                rest.append(args[i])
                i += 1
        state = self._state(version, flavour)
        work = copy.deepcopy(state.get(table) or Table.fresh(table))
        self._command(version, work, rest)
        state[table] = work
        return ""

    # ------------------------------------------------------------------ restore interpreter

    def _parse_restore(self, version: int, state: dict[str, Table], text: str, noflush: bool) -> dict[str, Table]:
        committed: dict[str, Table] = {}
        work: Table | None = None
        lineno = 0
        for lineno, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            try:
                if line.startswith("*"):
                    if work is not None:
                        raise RestoreFailed(f"table '{work.name}' was not committed before '{line}'")
                    name = line[1:].strip()
                    if noflush and name in state:
                        work = copy.deepcopy(committed.get(name) or state[name])
                    else:
                        work = Table.fresh(name)
                elif line == "COMMIT":
                    if work is None:
                        raise RestoreFailed("COMMIT outside a table")
                    committed[work.name] = work
                    work = None
                elif line.startswith(":"):
                    if work is None:
                        raise RestoreFailed("chain declaration outside a table")
                    self._declare(work, line, noflush)
                elif line.startswith("-"):
                    if work is None:
                        raise RestoreFailed("command outside a table")
                    self._command(version, work, shlex.split(line))
                else:
                    raise RestoreFailed(f"unexpected input '{line}'")
            except RestoreFailed as failure:
                failure.line = failure.line or lineno
                raise
            except ValueError as exc:     # shlex: unbalanced quotes
                raise RestoreFailed(str(exc), lineno) from None
        if work is not None:
            raise RestoreFailed("COMMIT expected", lineno + 1)
        return committed

    @staticmethod
    def _declare(work: Table, line: str, noflush: bool) -> None:
        parts = line[1:].split()
        if len(parts) < 2:
            raise RestoreFailed(f"bad chain declaration '{line}'")
        name, policy = parts[0], parts[1]
        _check_chain_name(name)
        existing = work.chains.get(name)
        if existing is not None and existing.builtin:
            if policy not in ("-", "ACCEPT", "DROP"):
                raise RestoreFailed(f"bad policy '{policy}' for built-in chain {name}")
            if policy != "-":
                existing.policy = policy
            return
        if policy != "-":
            raise RestoreFailed(f"cannot set a policy on user-defined chain {name}")
        # Declaring an existing user chain flushes it, even under --noflush.
        work.chains[name] = Chain(name)

    def _command(self, version: int, work: Table, tokens: list[str]) -> None:
        if not tokens:
            raise RestoreFailed("empty command")
        op, args = tokens[0], tokens[1:]

        def need_chain() -> Chain:
            if not args:
                raise RestoreFailed(f"{op} needs a chain name")
            return work.chain(args[0])

        if op in ("-A", "--append"):
            chain = need_chain()
            chain.rules.append(self._canonical_rule(version, work, args[1:]))
        elif op in ("-I", "--insert"):
            chain = need_chain()
            position, spec = 1, args[1:]
            if spec and spec[0].isdigit():
                position, spec = int(spec[0]), spec[1:]
            if not 1 <= position <= len(chain.rules) + 1:
                raise RestoreFailed(f"index of insertion {position} too big for chain {chain.name}")
            chain.rules.insert(position - 1, self._canonical_rule(version, work, spec))
        elif op in ("-R", "--replace"):
            chain = need_chain()
            if len(args) < 2 or not args[1].isdigit():
                raise RestoreFailed("-R needs a rule number")
            position = int(args[1])
            if not 1 <= position <= len(chain.rules):
                raise RestoreFailed(f"index of replacement {position} too big for chain {chain.name}")
            chain.rules[position - 1] = self._canonical_rule(version, work, args[2:])
        elif op in ("-D", "--delete"):
            chain = need_chain()
            if len(args) == 2 and args[1].isdigit():
                position = int(args[1])
                if not 1 <= position <= len(chain.rules):
                    raise RestoreFailed(f"index of deletion {position} too big for chain {chain.name}")
                del chain.rules[position - 1]
            else:
                rule = self._canonical_rule(version, work, args[1:])
                if rule not in chain.rules:
                    raise RestoreFailed("bad rule (does a matching rule exist in that chain?)")
                chain.rules.remove(rule)
        elif op in ("-F", "--flush"):
            targets = [work.chain(args[0])] if args else list(work.chains.values())
            for chain in targets:
                chain.rules.clear()
        elif op in ("-N", "--new-chain"):
            if not args:
                raise RestoreFailed("-N needs a chain name")
            _check_chain_name(args[0])
            if args[0] in work.chains:
                raise RestoreFailed(f"chain '{args[0]}' already exists")
            work.chains[args[0]] = Chain(args[0])
        elif op in ("-X", "--delete-chain"):
            chain = need_chain()
            if chain.builtin:
                raise RestoreFailed(f"cannot delete built-in chain {chain.name}")
            if chain.rules:
                raise RestoreFailed(f"chain {chain.name} is not empty")
            if work.references(chain.name):
                raise RestoreFailed(f"chain {chain.name} is still referenced")
            del work.chains[chain.name]
        elif op in ("-Z", "--zero"):
            pass                               # counters are not modelled
        elif op in ("-P", "--policy"):
            chain = need_chain()
            if not chain.builtin or len(args) != 2 or args[1] not in ("ACCEPT", "DROP"):
                raise RestoreFailed(f"bad policy command {' '.join(tokens)}")
            chain.policy = args[1]
        else:
            raise RestoreFailed(f"unknown command '{op}'")

    # ------------------------------------------------------------------ rule validation

    def _canonical_rule(self, version: int, work: Table, tokens: list[str]) -> str:
        """Validate a rule and return it as iptables-save would print it."""
        head: dict[str, str] = {}
        matches: list[tuple[str, list[str]]] = []
        target: list[str] = []
        protocol = None
        i = 0

        def value() -> str:
            if i + 1 >= len(tokens):
                raise RestoreFailed(f"option {tokens[i]} requires an argument")
            return tokens[i + 1]

        negate = ""
        while i < len(tokens):
            tok = tokens[i]
            if tok == "!":
                negate = "! "
                i += 1
                continue
            if tok in ("-s", "--source", "-d", "--destination"):
                key = "-s" if tok in ("-s", "--source") else "-d"
                head[key] = negate + _network(value(), version)
                i += 2
            elif tok in ("-i", "--in-interface", "-o", "--out-interface"):
                key = "-i" if tok in ("-i", "--in-interface") else "-o"
                head[key] = negate + value()
                i += 2
            elif tok in ("-p", "--protocol"):
                protocol = _protocol(value(), version)
                head["-p"] = negate + protocol
                i += 2
            elif tok in ("-m", "--match"):
                name = value()
                matches.append((name, []))
                i += 2
            elif tok in ("-j", "--jump"):
                name = value()
                if name not in STANDARD_TARGETS:
                    if name not in work.chains:
                        raise RestoreFailed(f"jump to chain '{name}' which does not exist")
                    if work.chains[name].builtin:
                        raise RestoreFailed(f"cannot jump to built-in chain {name}")
                target = ["-j", name]
                i += 2
            elif tok.startswith("--") and target:
                target += [tok, value()]       # target options such as --reject-with
                i += 2
            elif tok.startswith("--"):
                if not matches and protocol in ("tcp", "udp") and tok in ("--dport", "--sport",
                                                                          "--destination-port", "--source-port"):
                    matches.append((protocol, []))   # implicit match, as iptables loads it
                if not matches:
                    raise RestoreFailed(f"unknown option '{tok}'")
                matches[-1][1].extend([negate + tok if negate else tok, value()])
                i += 2
            else:
                raise RestoreFailed(f"bad argument '{tok}'")
            negate = ""

        parts = [f"{k} {head[k]}" for k in ("-s", "-d", "-i", "-o", "-p") if k in head]
        for name, options in matches:
            parts.append(f"-m {name}" + "".join(f" {o}" for o in _match_options(name, options, protocol, version)))
        if target:
            parts.append(" ".join(target))
        return " ".join(parts)


def _check_chain_name(name: str) -> None:
    if not name or len(name) > CHAIN_NAME_MAX or name.startswith("-") or name in STANDARD_TARGETS:
        raise RestoreFailed(f"invalid chain name '{name}'")


def _network(text: str, version: int) -> str:
    try:
        if "%" in text:          # Python takes an IPv6 scope; iptables does not resolve one
            raise ValueError(text)
        network = ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise RestoreFailed(f"host/network '{text}' not found") from None
    if network.version != version:
        raise RestoreFailed(f"'{text}' is not an IPv{version} address")
    return network.with_prefixlen


def _protocol(text: str, version: int) -> str:
    name = text.lower()
    if name == "icmpv6":
        name = "ipv6-icmp"
    # Both tools take any protocol name (ip6tables -p icmp is legal, if useless); the
    # family check lives in the icmp/icmp6 matches, as in the real extensions.
    if name not in {"tcp", "udp", "all", "sctp", "esp", "ah", "gre", "icmp", "ipv6-icmp"}:
        raise RestoreFailed(f"unknown protocol '{text}' for IPv{version}")
    return name


def _port(text: str) -> int:
    if not text.isdigit() or not 0 <= int(text) <= 65535:
        raise RestoreFailed(f"invalid port '{text}'")
    return int(text)


def _port_range(text: str) -> str:
    if ":" in text:
        low, high = text.split(":", 1)
        if _port(low) > _port(high):
            raise RestoreFailed(f"invalid port range '{text}'")
        return text
    _port(text)
    return text


def _icmp_type(text: str) -> str:
    kind, _, code = text.partition("/")
    for part in (kind, code) if code else (kind,):
        if not part.isdigit() or not 0 <= int(part) <= 255:
            raise RestoreFailed(f"invalid ICMP type '{text}'")
    return text


def _match_options(name: str, options: list[str], protocol: str | None, version: int) -> list[str]:
    out: list[str] = []
    pairs = list(zip(options[::2], options[1::2]))
    if name in ("tcp", "udp"):
        if protocol != name:
            raise RestoreFailed(f"-m {name} needs -p {name}")
        for opt, val in pairs:
            bare = opt.lstrip("! ")
            canonical = {"--dport": "--dport", "--destination-port": "--dport",
                         "--sport": "--sport", "--source-port": "--sport"}.get(bare)
            if canonical is None:
                raise RestoreFailed(f"unknown option '{bare}' for -m {name}")
            out += [opt.replace(bare, canonical), _port_range(val)]
    elif name == "multiport":
        if protocol not in ("tcp", "udp", "sctp"):
            raise RestoreFailed("multiport needs -p tcp, udp or sctp")
        for opt, val in pairs:
            if opt.lstrip("! ") not in ("--dports", "--sports", "--ports"):
                raise RestoreFailed(f"unknown option '{opt}' for -m multiport")
            items = val.split(",")
            if len(items) > MULTIPORT_MAX:
                raise RestoreFailed("too many ports specified")
            out += [opt, ",".join(_port_range(item) for item in items)]
    elif name == "icmp":
        if version != 4 or protocol != "icmp":
            raise RestoreFailed("-m icmp needs IPv4 and -p icmp")
        for opt, val in pairs:
            if opt.lstrip("! ") != "--icmp-type":
                raise RestoreFailed(f"unknown option '{opt}' for -m icmp")
            out += [opt, _icmp_type(val)]
    elif name == "icmp6":
        if version != 6 or protocol != "ipv6-icmp":
            raise RestoreFailed("-m icmp6 needs IPv6 and -p ipv6-icmp")
        for opt, val in pairs:
            if opt.lstrip("! ") != "--icmpv6-type":
                raise RestoreFailed(f"unknown option '{opt}' for -m icmp6")
            out += [opt, _icmp_type(val)]
    elif name == "comment":
        if len(pairs) != 1 or pairs[0][0] != "--comment":
            raise RestoreFailed("-m comment needs exactly one --comment")
        # iptables-nft silently truncates a long comment; a diff keyed on comments must survive that.
        text = pairs[0][1][:COMMENT_MAX]
        out += ["--comment", '"' + text.replace('"', '\\"') + '"']
    elif name in ("conntrack", "state"):
        for opt, val in pairs:
            if opt not in ("--ctstate", "--state"):
                raise RestoreFailed(f"unknown option '{opt}' for -m {name}")
            out += [opt, val]
    else:
        raise RestoreFailed(f"match '{name}' is not known to FakeIptables")
    return out
