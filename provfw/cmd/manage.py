"""provfw-manage: operator tasks that do not go through the REST API.

    provfw-manage [--config-file F] db sync | db version | db check
    provfw-manage db purge --before DATE | --older-than-days N [--audit-records] [--max-rows N]
                                                                  (delete the rows of long-deleted rules)
    provfw-manage token create --name NAME --role admin|reader     (prints the secret once)
    provfw-manage token list | token revoke --name NAME
    provfw-manage config sample                                   (oslo-config-generator's sample, as in etc/provfw/)
    provfw-manage rules purge-expired [--older-than SECONDS]
    provfw-manage service list | service delete --host HOST
    provfw-manage nwfilter ensure-refs                             (add the provider filterref to instance filters)
    provfw-manage dataplane apply | dataplane teardown             (this host's firewall, once, in the foreground)
    provfw-manage bus create-user --role compute --host HOST       (least-privilege RabbitMQ user of one hypervisor)
    provfw-manage bus create-user --role control --user NAME       (the API / conductor user)
    provfw-manage bus permissions --role compute --host HOST       (print the permission regexes)
    provfw-manage bus delete-user --user NAME
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

from oslo_config import cfg

from provfw import conf as provfw_conf
from provfw import exception
from provfw.cmd import common

CONF = provfw_conf.CONF


def _actions(subparsers, name: str, help_: str):
    """A command whose actions (``provfw-manage NAME ACTION``) are its own subparsers; one is required."""
    return subparsers.add_parser(name, help=help_).add_subparsers(dest="action", required=True)


def _utc_datetime(text: str) -> datetime.datetime:
    """``--before``: an ISO 8601 date or date and time as naive UTC (the database's timestamps)."""
    try:
        when = datetime.datetime.fromisoformat(text)
        if when.tzinfo is not None:
            when = when.astimezone(datetime.timezone.utc).replace(tzinfo=None)
    except (ValueError, OverflowError):              # OverflowError: an offset that leaves years 1-9999
        raise argparse.ArgumentTypeError(f"not an ISO 8601 date or date and time in UTC years 1-9999: {text!r} "
                                         "(e.g. 2026-11-01 or 2026-11-01T12:00:00Z)") from None
    if when > _utcnow():
        # Everything deleted so far is older than any future date; with --audit-records a typo (2062 for 2026)
        # would also take every audit record.  --older-than-days 0 says "everything" on purpose.
        raise argparse.ArgumentTypeError(f"{text!r} is in the future (to purge every deleted rule so far: "
                                         "--older-than-days 0)")
    return when


def _utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)


MAX_DAYS = 36_500        # a hundred years: --older-than-days beyond it is a typo, not a retention policy


def _days(text: str) -> float:
    try:
        days = float(text)
    except ValueError:
        days = -1.0
    if not 0 <= days <= MAX_DAYS:
        raise argparse.ArgumentTypeError(f"not a number of days from 0 to {MAX_DAYS:,}: {text!r}")
    return days


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"not a whole number of 1 or more: {text!r}")
    return int(text)


def _database_exists() -> None:
    """SchemaNotReady, before anything is opened or made, when provfw's SQLite file is missing or empty: opening
    it would create the file (and ``database_url`` the state directory) and then fail on the first table."""
    url = CONF.database.connection
    path = os.path.join(CONF.state_path, "provfw.sqlite") if not url else (
        url[len("sqlite:///"):] if url.startswith("sqlite:///") else None)
    if path is not None and (not os.path.isfile(path) or os.path.getsize(path) == 0):
        state = "an empty file" if os.path.isfile(path) else "no file"
        raise exception.SchemaNotReady(f"no database at {path} ({state}): point --config-file at the deployment's "
                                       "configuration, or run 'provfw-manage db sync' to create it")


def _purge(db, args) -> int:
    """``db purge``: delete long-deleted rules (and old audit records); say what went and what it means."""
    before = args.before
    if before is None:
        before = _utcnow() - datetime.timedelta(days=args.older_than_days)
    result = db.provider_fw_purge_deleted(before, audit_records=args.audit_records, max_rows=args.max_rows,
                                          audit=db.Audit("provfw-manage"))
    what = f"{result.rules} deleted rule(s)"
    if args.audit_records:
        what += f" and {result.audit_records} audit record(s)"
    print(f"purged {what} from before {before:%Y-%m-%d %H:%M:%S} UTC")
    if result.rules:
        print(f"hosts that applied a generation older than {result.purged_generation} get a full snapshot on "
              "their next check")
    return 0


def _add_commands(subparsers) -> None:
    dbp = _actions(subparsers, "db", "the schema: sync (migrate), version, check; purge deleted rows")
    dbp.add_parser("sync", help="create or upgrade the schema (alembic upgrade head)")
    dbp.add_parser("version", help="print the schema revision")
    dbp.add_parser("check", help="fail if models and migrations disagree (alembic check)")
    purge_db = dbp.add_parser(
        "purge", help="delete the rows of rules deleted before a date (and, with --audit-records, older audit "
                      "records), as 'nova-manage db purge'; hosts further behind then get a snapshot",
        description="Rules are soft-deleted, so hosts catching up can be told what to stop enforcing; the rows "
                    "stay until purged.  Live rules are never touched.  A host whose applied generation is older "
                    "than the newest deletion purged gets a full snapshot instead of a delta on its next check.")
    when = purge_db.add_mutually_exclusive_group(required=True)
    when.add_argument("--before", type=_utc_datetime, metavar="DATE",
                      help="ISO 8601 date or date and time (UTC unless it carries an offset), e.g. 2026-11-01")
    when.add_argument("--older-than-days", type=_days, metavar="N",
                      help=f"rules deleted more than N days ago (0 to {MAX_DAYS:,}; fractions allowed)")
    purge_db.add_argument("--audit-records", action="store_true",
                          help="also delete the audit records created before the same date")
    purge_db.add_argument("--max-rows", type=_positive_int, metavar="N",
                          help="stop after N rows of each table, rules and audit records counted apart (default: "
                               "all, in batches of 1,000)")

    token = _actions(subparsers, "token", "API tokens: create, list, revoke (only SHA-256 hashes are stored)")
    create = token.add_parser("create", help="create a token and print its secret once")
    create.add_argument("--name", required=True)
    create.add_argument("--role", required=True, choices=["admin", "reader"])
    token.add_parser("list", help="every token: name, role, active or revoked")
    revoke = token.add_parser("revoke", help="revoke a token by name "
                                             "(API processes stop accepting it within [api] token_cache_ttl)")
    revoke.add_argument("--name", required=True)

    config = _actions(subparsers, "config", "the sample configuration file")
    config.add_parser("sample", help="print every option with its default and help")

    rules = _actions(subparsers, "rules", "rule housekeeping: purge-expired")
    purge = rules.add_parser("purge-expired", help="delete expired rules now (the conductor does it periodically)")
    purge.add_argument("--older-than", type=float, default=0.0, help="seconds past expiry")

    svc = _actions(subparsers, "service", "the compute hosts' service rows: list, delete")
    svc.add_parser("list", help="every host: state, applied generation, rules, driver, last error")
    delete = svc.add_parser("delete", help="forget a decommissioned host")
    delete.add_argument("--host", required=True)

    nwf = _actions(subparsers, "nwfilter", "libvirt: ensure-refs (every domain's filter references nova-provider)")
    nwf.add_parser("ensure-refs", help="make each domain's nwfilter reference nova-provider")

    bus = subparsers.add_parser("bus", help="RabbitMQ users with least privilege (runs rabbitmqctl)")
    bus_actions = bus.add_subparsers(dest="action", required=True)
    helps = {"create-user": "create a RabbitMQ user for one role, with exactly its permissions (docs/deployment.md)",
             "permissions": "print the permission patterns (configure, write, read) a role's user gets"}
    for name in ("create-user", "permissions"):
        cmd = bus_actions.add_parser(name, help=helps[name])
        cmd.add_argument("--role", required=True, choices=["compute", "control"],
                         help="compute: one hypervisor's worker; control: provfw-api and provfw-conductor")
        cmd.add_argument("--host", help="the compute host ([compute] host) this user may speak for")
        cmd.add_argument("--user", help="user name (compute default: [conductor] compute_user_prefix + host)")
        cmd.add_argument("--vhost", default="/", help="the RabbitMQ virtual host (default /)")
        if name == "create-user":
            cmd.add_argument("--password-file", help="read the password from this file (default: generate one "
                                                     "and print it once)")
            cmd.add_argument("--print", dest="print_only", action="store_true",
                             help="print the rabbitmqctl commands instead of running them")
    delete_user = bus_actions.add_parser("delete-user", help="delete a bus user (rabbitmqctl delete_user)")
    delete_user.add_argument("--user", required=True)

    dataplane = _actions(subparsers, "dataplane", "this host's kernel rules: apply once, teardown")
    dataplane.add_parser("apply", help="apply the current rules to this host once")
    dataplane.add_parser("teardown", help="remove provfw's chains, jump, sets or filter from this host")


def _command_args(argv):
    parser = argparse.ArgumentParser(
        prog="provfw-manage", usage="provfw-manage [--config-file PATH ...] [--config-dir DIR] COMMAND ...",
        epilog="--config-file / --config-dir (oslo.config) come before the command; default: "
               "/etc/provfw/provfw.conf when it exists.")
    # Subcommands are named from prog, not from the usage line above ("provfw-manage db purge: error: ...").
    sub = parser.add_subparsers(dest="category", required=True, prog="provfw-manage")
    _add_commands(sub)
    return parser.parse_args(argv)


def _newer(current: str, head: str) -> str:
    return (f"the schema is at {current}, which this release (at {head}) does not know: a newer release "
            f"migrated it, and only that release can sync or check it")


def _db_check(migration, url: str) -> int:
    """``db check``: 0 when the schema is at this release's head and matches the models; 1, saying which, if not."""
    from alembic.util import exc as alembic_exc

    current, head = migration.db_version(url), migration.head_revision()
    if migration.schema_newer(current):
        print(f"provfw-manage: {_newer(current, head)}", file=sys.stderr)
        return 1
    if current != head:
        print(f"provfw-manage: the schema is at {current or '(empty)'}, this release's at {head}: "
              f"run 'provfw-manage db sync'", file=sys.stderr)
        return 1
    try:
        migration.db_check(url)
    except alembic_exc.AutogenerateDiffsDetected as diffs:
        print(f"provfw-manage: the schema differs from the models: {diffs}", file=sys.stderr)
        return 1
    print("models and migrations agree")
    return 0


def run(args) -> int:
    """Every command but ``bus`` and ``config``, after ``db.configure``: the db layer (SQLAlchemy, alembic, a
    third of a second to import) is imported here, so those two run quickly on a broker node or a host
    without a database driver."""
    from provfw.cmd import psycopg_wait
    from provfw.db import api as db

    # libpq alone waits for a statement's answer without end: a database server that goes silent mid-command
    # (a hung host, a half-open path) would hold a purge started by a timer, and the next day's, for ever.
    psycopg_wait.install(green=False)
    # Commands that read or write provfw's tables (not: db sync/version/check, which make or read the schema
    # itself, nor nwfilter and dataplane teardown, which never open the database).
    needs_schema = (args.category in ("token", "rules", "service") or (args.category, args.action) in (
        ("db", "purge"), ("dataplane", "apply")))
    if needs_schema:
        _database_exists()
    url = provfw_conf.database_url()
    db.configure(url, CONF.database.pool_size)
    if needs_schema:
        db.ping()           # one line (SchemaNotReady, DatabaseUnavailable), not a traceback of the first query
    if args.category == "db" and args.action == "purge":
        return _purge(db, args)
    if args.category == "db":
        from provfw.db import migration     # alembic: only for these

        if args.action == "sync":
            current = migration.db_version(url)
            if migration.schema_newer(current):          # alembic would end in "Can't locate revision"
                print(f"provfw-manage: {_newer(current, migration.head_revision())}", file=sys.stderr)
                return 1
            migration.db_sync(url)
            print(f"schema at {migration.db_version(url)}")
        elif args.action == "version":
            print(migration.db_version(url) or "(empty)")
        else:
            return _db_check(migration, url)
        return 0
    if args.category == "token":
        if args.action == "create":
            print(db.api_token_create(args.name, args.role))
        elif args.action == "list":
            for token in db.api_token_get_all():
                state = f"revoked {token.revoked_at:%Y-%m-%d %H:%M}" if token.revoked_at else "active"
                print(f"{token.name}\t{token.role}\t{state}")
        else:
            db.api_token_revoke(args.name)
            print(f"revoked {args.name}")
        return 0
    if args.category == "rules":
        changes = db.provider_fw_rule_purge_expired(older_than=datetime.timedelta(seconds=args.older_than))
        if changes is not None:
            from provfw.compute import api as compute_api
            compute_api.ComputeAPI(CONF).notify(changes)
        print(f"purged {len(changes.removed) if changes else 0} expired rule(s)")
        return 0
    if args.category == "service":
        if args.action == "list":
            for service in db.service_get_all():
                print(json.dumps({"host": service.host, "driver": service.driver,
                                  "heartbeat_at": str(service.heartbeat_at),
                                  "applied_generation": service.applied_generation,
                                  "rule_count": service.rule_count, "last_error": service.last_error}))
        elif not db.service_destroy(args.host):
            raise exception.NotFound(f"no service row for host {args.host!r}")
        return 0
    if args.category == "nwfilter":
        import libvirt

        from provfw.virt.firewall import nwfilter
        conn = libvirt.open(CONF.libvirt.uri)
        try:
            changed = nwfilter.ensure_filter_refs(conn, CONF.libvirt.instance_filter_pattern,
                                                  CONF.libvirt.provider_filter)
        finally:
            conn.close()
        for name in changed:
            print(f"added filterref {CONF.libvirt.provider_filter} to {name}")
        print(f"{len(changed)} filter(s) changed")
        return 0
    if args.category == "dataplane":
        from provfw.virt import driver as virt_driver
        from provfw.virt.firewall import RuleUpdate
        compute = virt_driver.load_compute_driver(CONF)
        try:
            if args.action == "apply":
                # provfw-manage has database access (a worker has not): read the live rules directly.
                snapshot = db.provider_fw_snapshot()
                applied = compute.refresh_provider_fw_rules(RuleUpdate.rebuild([r.spec for r in snapshot.rules]))
                print(json.dumps({"generation": snapshot.generation, "rules": len(snapshot.rules),
                                  "changed": applied.changed, "mode": applied.mode,
                                  "seconds": round(applied.seconds, 3)}))
            else:
                driver = compute.firewall_driver
                driver.teardown()
                where = f"network namespace {CONF.compute.dataplane_netns}" if CONF.compute.dataplane_netns \
                    else "this host"
                kept = ("; nova-local, the security groups' chain, is left in place"
                        if getattr(driver, "layout", None) is not None else "")      # the iptables-based drivers
                print(f"removed provfw's {driver.name} rules from {where}{kept}")
        finally:
            compute.close()
        return 0
    raise AssertionError(args.category)


def bus_user_and_permissions(args):
    """(user name, rpc.Permissions) for ``bus`` commands; UsageError-style ProvfwError when incomplete."""
    from provfw import rpc

    if args.role == "compute":
        if not args.host:
            raise exception.InvalidInput("--host", "is required for a compute user")
        expected = CONF.conductor.compute_user_prefix + rpc.check_host(args.host)
        if args.user and args.user != expected:
            # The conductor takes a report for host H only from the user [conductor] compute_user_prefix + H.
            print(f"{common.program()}: warning: the conductor accepts {args.host}'s reports only from the user "
                  f"'{expected}' ([conductor] compute_user_prefix + host); set compute_user_prefix so that "
                  f"'{args.user}' is that name, in this file and in the conductor's", file=sys.stderr)
        return (args.user or expected, rpc.compute_user_permissions(CONF, args.host))
    if not args.user:
        raise exception.InvalidInput("--user", "is required for the control user")
    return args.user, rpc.control_user_permissions(CONF)


def bus_command(args) -> int:
    """Create, show or delete RabbitMQ users through rabbitmqctl (run on a broker node)."""
    import secrets
    import shlex
    import subprocess

    def rabbitmqctl(*argv: str, stdin: str | None = None) -> None:
        result = subprocess.run(["rabbitmqctl", *argv], input=stdin, capture_output=True, text=True)
        if result.returncode != 0:
            raise exception.ProvfwError(f"rabbitmqctl {argv[0]} failed: {result.stderr.strip() or result.stdout}")

    if args.action == "delete-user":
        rabbitmqctl("delete_user", args.user)
        print(f"deleted bus user {args.user}")
        return 0
    user, perms = bus_user_and_permissions(args)
    if args.action == "permissions":
        print(f"user:      {user}\nvhost:     {args.vhost}\nconfigure: {perms.configure}\n"
              f"write:     {perms.write}\nread:      {perms.read}")
        return 0
    if args.password_file:
        with open(args.password_file) as handle:
            password = handle.read().strip()
    else:
        password = secrets.token_urlsafe(24)
    permissions = ["set_permissions", "-p", args.vhost, user, perms.configure, perms.write, perms.read]
    if args.print_only:
        print(f"printf '%s' {shlex.quote(password)} | rabbitmqctl add_user {shlex.quote(user)}")
        print("rabbitmqctl " + " ".join(shlex.quote(a) for a in permissions))
        return 0
    rabbitmqctl("add_user", user, stdin=password)     # from stdin: never on a command line
    rabbitmqctl(*permissions)
    print(f"created bus user {user} ({args.role}) on vhost {args.vhost}")
    if not args.password_file:
        print(f"password: {password}")
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # oslo.config owns --config-file/--config-dir; everything after them is our sub-command.
    conf_args, rest = [], list(argv)
    while rest and rest[0].startswith("--config"):
        option = rest.pop(0)
        conf_args.append(option)
        if "=" not in option and rest:
            conf_args.append(rest.pop(0))
    args = _command_args(rest)
    try:
        provfw_conf.parse_args(conf_args)
        provfw_conf.check_values()
    except (cfg.Error, exception.ConfigError) as exc:
        print(f"provfw-manage: {exc}", file=sys.stderr)
        return 2
    # A command-line tool: its answers go to stdout (scripts capture them, e.g. a token's secret),
    # its log lines to stderr - unless the configuration names a log file or journald.
    CONF.set_default("use_stderr", True)
    common.setup_logging()
    try:
        if args.category == "config":
            # Needs no database: printing the sample must not create state_path either.
            sys.stdout.write(provfw_conf.sample_config())
            return 0
        if args.category == "bus":
            return bus_command(args)       # talks to rabbitmqctl, never to the database
        return run(args)
    except exception.ProvfwError as exc:
        message = exc.message
        cause = getattr(exc.__cause__, "orig", None) or exc.__cause__
        if isinstance(exc, exception.DatabaseUnavailable) and cause is not None and str(cause).strip():
            # The API keeps the driver's text to its log; on an operator's terminal it says what is wrong
            # (e.g. 'FATAL: database "provfw" does not exist' rather than only "unreachable").
            message += f": {str(cause).strip().splitlines()[0]}"
        print(f"provfw-manage: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
