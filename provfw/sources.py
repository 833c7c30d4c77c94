"""Rule sources: who wants a rule, until when, and what a sync of one source changes.

Every live rule is wanted by one or more *sources*:

* ``manual`` (or ``manual:LABEL``): blocks made through REST and the CLI;
* ``import:NAME``: a list imported through ``POST /v1/provider-fw-rules/import``;
* ``feed:NAME``: a feed the conductor fetches on a schedule.

Each source has its own expiry for the rule (None = never).  The rule's own
``expires_at``, the one hosts enforce, is the *latest* of its sources'
expiries, None winning; the rule lives until the last source lets go of it.
A source that asks again with a later expiry (or none) extends its own wish;
an earlier expiry never shortens it.

``plan_sync`` is the pure planner behind every rule mutation that adds or
replaces a source's rules: it takes what the database holds for the affected
rules and returns what to write.  The database layer reads, plans, checks the
guard and writes, in one transaction.  Nothing here touches the database.
"""

from __future__ import annotations

import dataclasses
import datetime
import re
from typing import Iterable, Mapping, NamedTuple, Sequence

from provfw import exception
from provfw.rules import RuleSpec

KINDS = ("manual", "import", "feed")
MANUAL = "manual"
NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"
_NAME_RE = re.compile(NAME_PATTERN)
#: A source as clients spell it (JSON Schema pattern): ``manual``, ``KIND:NAME`` or a bare ``NAME``.
SOURCE_PATTERN = rf"^((manual|import|feed):)?{NAME_PATTERN}$"
MAX_SOURCE_LENGTH = len("import:") + 64


def source_name(kind: str, name: str) -> str:
    """``kind:name`` after checking ``name`` (InvalidInput with field ``source`` otherwise)."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise exception.InvalidInput(
            "source", f"{str(name)[:80]!r} is not a source name: 1-64 letters, digits, '.', '_' or '-', "
                      "starting with a letter or digit")
    return f"{kind}:{name}"


def parse_source(value: object, default_kind: str, allowed: Sequence[str] = ("manual", "import")) -> str:
    """Normalise a ``source`` given by a client; raise InvalidInput (field ``source``) if it is not one.

    ``manual``, ``manual:LABEL``, ``import:NAME`` and ``feed:NAME`` are full
    sources; a bare ``NAME`` gets ``default_kind`` (``manual`` for blocks,
    ``import`` for imports).  Kinds outside ``allowed`` are refused: only the
    conductor writes ``feed:`` sources, so a client cannot make a feed's
    replace-sync drop rules it added by hand.
    """
    if not isinstance(value, str) or not value:
        raise exception.InvalidInput("source", "must be a non-empty string such as 'manual' or 'import:spamhaus'")
    if value == MANUAL:
        kind, name = MANUAL, None
    elif ":" in value:
        kind, _, name = value.partition(":")
    else:
        kind, name = default_kind, value
    if kind not in KINDS:
        raise exception.InvalidInput("source", f"{value[:80]!r}: the kind must be one of {', '.join(KINDS)}")
    if kind not in allowed:
        raise exception.InvalidInput("source", f"{value[:80]!r}: {kind} sources are written only by "
                                               f"{'the feeds' if kind == 'feed' else 'other calls'}; "
                                               f"use {' or '.join(allowed)}")
    if name is None:
        if kind != MANUAL:
            raise exception.InvalidInput("source", f"{value[:80]!r}: {kind} needs a name ({kind}:NAME)")
        return MANUAL
    return source_name(kind, name)


# --------------------------------------------------------------------------- expiry arithmetic

Expiry = datetime.datetime | None   # naive UTC, as the database stores it; None = never


def latest(expiries: Iterable[Expiry]) -> Expiry:
    """The latest of ``expiries``, None (never) winning.  ValueError for an empty iterable."""
    found = False
    best: datetime.datetime | None = None
    for value in expiries:
        if value is None:
            return None
        best = value if not found or value > best else best  # type: ignore[operator]
        found = True
    if not found:
        raise ValueError("latest() of no expiries")
    return best


def extends(current: Expiry, wanted: Expiry, slack: float = 0.0) -> bool:
    """True when ``wanted`` lies later than ``current`` by more than ``slack`` seconds (None is latest).

    ``slack`` lets a feed synced every hour with a one-day TTL renew its
    rules once every half day instead of on every sync (each renewal of a
    rule is a change every host is told about).
    """
    if current is None:
        return False
    if wanted is None:
        return True
    return (wanted - current).total_seconds() > slack


def alive(expiry: Expiry, now: datetime.datetime) -> bool:
    return expiry is None or expiry > now


# --------------------------------------------------------------------------- the planner

class Held(NamedTuple):
    """A live rule as the planner sees it.

    ``expires_at``: the rule's effective expiry.  ``sources``: every source
    row of the rule (source -> its expiry), or None when the rule has no
    source rows at all (written by a release before sources existed; it is
    taken as ``manual`` with the rule's expiry).  ``spec`` may be the plain
    tuple of a RuleSpec (equal to it) for rules only looked up; every spec the
    plan names (retire, delete, removed) is a RuleSpec.
    """

    rule_id: int
    spec: RuleSpec
    expires_at: Expiry
    sources: Mapping[str, Expiry] | None


@dataclasses.dataclass(frozen=True)
class Guard:
    """Refuse a replace that would stop more than ``max_fraction`` of a source's rules in force, when that is
    also at least ``min_rules`` rules (a three-entry list losing two is not a truncated download)."""

    max_fraction: float = 0.5
    min_rules: int = 10


@dataclasses.dataclass(frozen=True)
class GuardReport:
    in_force: int          # the source's rules in force before
    removing: int          # of those, how many the replace would drop
    max_fraction: float
    min_rules: int

    @property
    def tripped(self) -> bool:
        return self.removing >= self.min_rules and self.removing > self.max_fraction * self.in_force

    def as_dict(self) -> dict:
        return {"in_force": self.in_force, "removing": self.removing, "max_fraction": self.max_fraction,
                "min_rules": self.min_rules, "tripped": self.tripped}


@dataclasses.dataclass
class Plan:
    """What one sync writes.  Rule ids refer to live rows; ``create`` are specs without one.

    * ``create``: specs to insert as new rules (with a source row each);
    * ``retire``: live rules already past their expiry to soft-delete first (their spec may be created again);
    * ``source_insert`` / ``source_update``: (rule_id, source, expiry) rows to insert or to set;
    * ``source_delete``: (rule_id, source) rows to delete;
    * ``rule_expiry``: rule_id -> new effective expiry (renewed, or shortened when a source let go);
    * ``delete``: live rules no source wants any more;
    * the specs behind the answer's counts: ``renewed`` (the rule's expiry moved later: hosts are told),
      ``duplicate`` (live already, hosts see no change) and within it ``unchanged`` (this source already
      wanted it at least as long: the request changed nothing at all), ``removed`` (this source let go);
    * ``settled``: how many more wanted rules changed nothing, counted but not listed (``plan_sync``).
    """

    create: list[RuleSpec] = dataclasses.field(default_factory=list)
    retire: list[Held] = dataclasses.field(default_factory=list)
    source_insert: list[tuple[int, str, Expiry]] = dataclasses.field(default_factory=list)
    source_update: list[tuple[int, str, Expiry]] = dataclasses.field(default_factory=list)
    source_delete: list[tuple[int, str]] = dataclasses.field(default_factory=list)
    rule_expiry: dict[int, Expiry] = dataclasses.field(default_factory=dict)
    delete: list[Held] = dataclasses.field(default_factory=list)
    renewed: list[RuleSpec] = dataclasses.field(default_factory=list)
    duplicate: list[RuleSpec] = dataclasses.field(default_factory=list)
    unchanged: list[RuleSpec] = dataclasses.field(default_factory=list)
    removed: list[RuleSpec] = dataclasses.field(default_factory=list)
    guard: GuardReport | None = None
    settled: int = 0

    @property
    def duplicates(self) -> int:
        """How many wanted rules were live already and kept their expiry: ``duplicate`` and ``settled``."""
        return len(self.duplicate) + self.settled

    @property
    def changes_anything(self) -> bool:
        return bool(self.create or self.retire or self.source_insert or self.source_update or self.source_delete
                    or self.rule_expiry or self.delete)


#: One live rule a source holds, as a replace reads it (``OwnRow``): its spec's four fields, then the rule's
#: id and effective expiry, then this source's own wish (its source row's expiry).
OWN_RULE_ID, OWN_EXPIRES, OWN_MINE = 4, 5, 6
OwnRow = tuple


def plan_sync(source: str, wanted: Sequence[RuleSpec], expires_at: Expiry, held: Mapping[RuleSpec, Held],
              now: datetime.datetime, replace: bool = False, slack: float = 0.0,
              guard: Guard | None = None, own: Mapping[tuple, OwnRow] | None = None, settled: int = 0) -> Plan:
    """Plan making ``source`` want ``wanted`` until ``expires_at`` (and, with ``replace``, nothing else).

    ``held`` maps every spec that has a live rule and matters - each wanted
    spec that is live, and with ``replace`` every rule ``source`` holds - to
    what the database has.  ``wanted`` must hold distinct specs.  A wanted
    rule whose source already wants it for at least as long (within
    ``slack`` seconds) is a duplicate; a later expiry renews it.  The guard
    report is filled in for a replace (the caller decides what to do with a
    tripped one); ``guard`` None means ``Guard()``.

    ``own``: the rules ``source`` holds given as the database's rows instead
    (``OwnRow``: ``(cidr, protocol, from_port, to_port, rule_id, expires_at,
    mine)``, keyed by the first four), every one of them.  Then ``held``
    needs only the other rules that matter: wanted specs live without this
    source, and each rule of ``own`` that is not wanted, with all its
    sources.  The plan is the one ``held`` alone would give; a replace of a
    120k-entry list whose rows are mostly unchanged then builds no ``Held``
    for them (retired rules of ``own`` carry only this source's wish).

    ``settled``: how many wanted rules the caller left out of ``wanted``
    and ``own`` because the source holds them with neither the rule nor
    its wish expiring (nothing can change for them, whatever
    ``expires_at``): counted as duplicates, unchanged and in force.

    Linear in ``wanted`` plus ``held`` (and ``own``); the loops are written
    for a 120k-entry list whose entries mostly change nothing (about 0.1 s
    for such a list).
    """
    plan = Plan(settled=settled)
    # A wish later than the current one by more than slack (None is latest) moves it: the bound to beat.
    beat = None if expires_at is None else expires_at - datetime.timedelta(seconds=slack)
    absent = _ABSENT
    own_get = (own or {}).get
    for spec in wanted:
        row = own_get(spec)
        if row is None:
            rule = held.get(spec)
            if rule is None:
                plan.create.append(spec)
                continue
            rule_id, rule_expires = rule.rule_id, rule.expires_at
        else:
            rule = None
            rule_id, rule_expires = row[OWN_RULE_ID], row[OWN_EXPIRES]
        if rule_expires is not None and rule_expires <= now:
            # Hosts stopped enforcing it at its expiry; a new rule takes its place.
            plan.retire.append(rule._replace(spec=spec) if rule is not None
                               else Held(rule_id, spec, rule_expires, {source: row[OWN_MINE]}))
            plan.create.append(spec)
            continue
        if rule is None:
            mine = row[OWN_MINE]
        else:
            sources = rule.sources
            if sources is None:
                # A rule from before sources existed: it was somebody's manual block until now.
                sources = {MANUAL: rule_expires}
                plan.source_insert.append((rule_id, MANUAL, rule_expires))
            mine = sources.get(source, absent)
        if mine is absent:
            plan.source_insert.append((rule_id, source, expires_at))
        elif mine is not None and (beat is None or mine < beat or mine <= now):
            # Later than this source's wish (or that wish had lapsed while others kept the rule): renew it.
            plan.source_update.append((rule_id, source, expires_at))
        else:
            plan.duplicate.append(spec)
            plan.unchanged.append(spec)
            continue
        # The rule lives as long as its latest source: it grows only if this wish outlives the others.
        if rule_expires is not None and (expires_at is None or expires_at > rule_expires):
            plan.rule_expiry[rule_id] = expires_at
            plan.renewed.append(spec)
        else:
            plan.duplicate.append(spec)
    if replace:
        _plan_release(plan, source, set(wanted), held, now, guard or Guard(), own)
    return plan


def _plan_release(plan: Plan, source: str, wanted: set, held: Mapping[RuleSpec, Held], now: datetime.datetime,
                  guard: Guard, own: Mapping[tuple, OwnRow] | None) -> None:
    """The replace half of ``plan_sync``: release what ``source`` holds and no longer wants."""
    in_force, removing = plan.settled, 0
    absent = _ABSENT
    if own is not None:
        # The source's rules are the rows of own; the full picture of those that leave is in held.
        for key, row in own.items():
            mine, rule_expires = row[OWN_MINE], row[OWN_EXPIRES]
            counts = (mine is None or mine > now) and (rule_expires is None or rule_expires > now)
            in_force += counts
            if key in wanted:
                continue
            removing += counts
            _release_one(plan, source, held[key], now)
    else:
        for spec, rule in held.items():
            sources = rule.sources
            mine = absent if sources is None else sources.get(source, absent)
            if mine is absent:
                continue
            rule_expires = rule.expires_at
            counts = (mine is None or mine > now) and (rule_expires is None or rule_expires > now)
            in_force += counts
            if spec in wanted:
                continue
            removing += counts
            _release_one(plan, source, rule, now)
    plan.guard = GuardReport(in_force, removing, guard.max_fraction, guard.min_rules)


def _release_one(plan: Plan, source: str, rule: Held, now: datetime.datetime) -> None:
    """``source`` lets go of ``rule`` (one of its rules; ``rule.sources`` has them all), within a replace."""
    plan.removed.append(rule.spec)
    plan.source_delete.append((rule.rule_id, source))
    remaining = [exp for name, exp in rule.sources.items() if name != source and alive(exp, now)]
    if not remaining or not alive(rule.expires_at, now):
        plan.delete.append(rule)
        return
    effective = latest(remaining)
    if effective != rule.expires_at:
        plan.rule_expiry[rule.rule_id] = effective      # shortened: the latest wish left is earlier


_ABSENT = object()


def release(source: str | None, rule: Held, now: datetime.datetime) -> tuple[bool, Expiry]:
    """``source`` lets go of ``rule`` (None: every source does).  Return (delete the rule?, its new expiry).

    Raise NotFound when the rule does not have ``source``.
    """
    if source is None:
        return True, rule.expires_at
    sources = rule.sources if rule.sources is not None else {MANUAL: rule.expires_at}
    if source not in sources:
        raise exception.NotFound(f"rule {rule.rule_id} is not wanted by source {source} "
                                 f"(its sources: {', '.join(sorted(sources))})")
    remaining = [exp for name, exp in sources.items() if name != source and alive(exp, now)]
    if not remaining:
        return True, rule.expires_at
    return False, latest(remaining)
