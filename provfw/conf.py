"""Configuration options (oslo.config), all declared in this one module.

:func:`list_opts` is the one list of every option group; it is also the
``oslo.config.opts`` entry point ``provfw`` (setup.cfg), so the standard
``oslo-config-generator --config-file etc/provfw/provfw-config-generator.conf``
renders ``etc/provfw/provfw.conf.sample`` from it, and so does
``provfw-manage config sample``.  A group added to ``list_opts`` appears in
the sample without further work; a unit test fails when the committed sample
drifts from the generator's output.  Defaults that depend on the host
(hostname, the home directory) carry a ``sample_default`` so the sample is
the same on every machine.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import io
import os
import re
import socket
import sys

from oslo_config import cfg
from oslo_log import log as oslo_log

import provfw
from provfw import exception

CONF = cfg.CONF

default_opts = [
    cfg.StrOpt("state_path", default=provfw.default_state_path(),
               sample_default="<home>/.local/state/provfw",
               help="Directory for the embedded SQLite database, the bootstrap admin token "
                    "and the per-host apply lock. Default: $PROVFW_STATE_PATH when set (the "
                    "provfw CLI looks for the admin token there too), else .local/state/provfw "
                    "in the home directory of the user running provfw."),
    cfg.StrOpt("transport_url", default="memory://",
               help="Message bus URL. 'memory://' is the in-process bus of provfw-all-in-one; "
                    "use rabbit://guest:guest@127.0.0.1:5672// (RabbitMQ) for a real deployment."),
    cfg.StrOpt("control_exchange", default="provfw",
               help="Prefix of the AMQP exchanges; the fanout exchange is '<prefix>_compute_fanout'."),
    cfg.ListOpt("protected_cidrs", default=["127.0.0.0/8", "::1/128"],
                help="Management networks that provider rules may never overlap; "
                     "a rule that does is refused with 409."),
    cfg.BoolOpt("allow_non_global", default=False,
                help="Accept rules for source ranges that are not globally routed: loopback, link-local "
                     "(169.254.0.0/16, the metadata service), 0.0.0.0/8 (DHCP), RFC 1918, CGNAT "
                     "(100.64.0.0/10), unique-local, multicast. Off: such CIDRs are refused with the range "
                     "named (imports and feeds refuse those lines), because blocking them cuts the cloud off "
                     "from itself. A request may still opt in with allow_non_global=true (audited); "
                     "protected_cidrs are refused either way."),
    cfg.IntOpt("max_rules", default=1_000_000, min=1,
               help="Largest number of live provider rules; past it new rules are refused."),
    cfg.IntOpt("max_cast_changes", default=1000, min=0,
               help="A trigger_provider_fw_rules cast carries the rules added and removed when there are at "
                    "most this many; a bigger change (a bulk import) carries only the generations and every "
                    "host fetches it from the conductor."),
    cfg.IntOpt("hung_loop_timeout", default=300, min=10,
               help="Seconds a daemon's essential loop (a worker's periodic check, cast consumer and cast applier, the "
                    "conductor's request server) may go without finishing a round before the daemon stops "
                    "answering systemd's watchdog (WATCHDOG=1), so that systemd restarts it. Longer than the "
                    "slowest full apply of this host. Only used under a unit with WatchdogSec=."),
]

metrics_opts = [
    cfg.HostAddressOpt("bind_host", default="127.0.0.1",
                       help="Address every provfw daemon's Prometheus endpoint (GET /metrics) listens on. The "
                            "loopback default exposes nothing off the host; use the management address (or "
                            "0.0.0.0) for a Prometheus server elsewhere."),
    cfg.PortOpt("api_port", default=9181,
                help="Metrics port of provfw-api (and of provfw-all-in-one, which serves the API's, the "
                     "conductor's and the worker's metrics together here). 0: no metrics endpoint."),
    cfg.PortOpt("conductor_port", default=9182, help="Metrics port of provfw-conductor. 0: no metrics endpoint."),
    cfg.PortOpt("compute_port", default=9183, help="Metrics port of provfw-compute. 0: no metrics endpoint."),
]

database_opts = [
    cfg.StrOpt("connection", default=None, secret=True,
               help="SQLAlchemy URL, e.g. postgresql+psycopg2://provfw@127.0.0.1/provfw or "
                    "mysql+pymysql://root@127.0.0.1/provfw. Empty: SQLite file under state_path."),
    cfg.IntOpt("pool_size", default=5, help="Connections kept open per process (not SQLite)."),
]

api_opts = [
    cfg.HostAddressOpt("bind_host", default="127.0.0.1", help="Address provfw-api listens on."),
    cfg.PortOpt("bind_port", default=8774, help="Port provfw-api listens on."),
    cfg.IntOpt("max_request_body_size", default=64 * 1024, min=1024,
               help="Largest JSON request body in bytes; bigger bodies get 413."),
    cfg.IntOpt("max_import_body_size", default=64 * 1024 * 1024, min=1024,
               help="Largest bulk import body in bytes; bigger bodies get 413."),
    cfg.FloatOpt("token_cache_ttl", default=10.0, min=0.0,
                 help="Seconds an API process remembers a token that authenticated, instead of reading it from the "
                      "database on every request; a revoked token stops working within this time. 0: no cache."),
    cfg.StrOpt("audit_log", default=None,
               help="File that receives one JSON line per mutation (besides the audit table). "
                    "Empty: audit lines go to the 'provfw.audit' logger only."),
]

compute_opts = [
    cfg.StrOpt("host", default=socket.gethostname(), sample_default="<hostname>",
               help="Name of this compute worker; one Service row per host."),
    cfg.StrOpt("compute_driver", default="libvirt",
               help="Compute (virt) driver: 'libvirt' (LibvirtConnection), 'fake' (FakeConnection) "
                    "or a dotted path to a class."),
    cfg.StrOpt("firewall_driver", default="iptables",
               help="Firewall driver: 'iptables' (IptablesFirewallDriver), 'nwfilter' (NWFilterFirewall), "
                    "'ipset', 'nftables', 'iptc', 'noop', or a dotted path to a class."),
    cfg.StrOpt("dataplane_netns", default="",
               help="Network namespace whose firewall the worker manages; empty means the host's own."),
    cfg.IntOpt("heartbeat_interval", default=5, min=1, help="Seconds between service heartbeats."),
    cfg.FloatOpt("report_min_interval", default=0.5, min=0.0,
                 help="Least seconds between two state reports that applies ask for: an apply when no report "
                      "left in the last interval is reported at once, the applies of a burst together at the end "
                      "of the interval (as Calico Felix's EndpointReportingDelaySecs). Meanwhile the host's row "
                      "(applied_generation, rule count, in_sync) may lag its kernel. 0 reports after every "
                      "apply."),
    cfg.IntOpt("reconcile_interval", default=10, min=1,
               help="Seconds between checks of the database generation and of kernel drift."),
    cfg.IntOpt("service_down_time", default=30, min=1,
               help="A worker whose heartbeat is older than this many seconds is reported down."),
    cfg.StrOpt("lock_path", default=None,
               help="Directory of the per-host apply lock; empty: state_path."),
]

iptables_opts = [
    cfg.StrOpt("provider_chain", default="nova-provider", help="Chain that holds the provider rules."),
    cfg.StrOpt("local_chain", default="nova-local",
               help="Chain that the provider chain continues to (security groups); never flushed."),
    cfg.StrOpt("forward_chain", default="FORWARD", help="Built-in chain whose first rule jumps to provider_chain."),
    cfg.StrOpt("backend", default="auto", choices=["auto", "nft", "legacy"],
               help="iptables flavour: 'auto' uses the host's iptables-restore alternative."),
    cfg.IntOpt("wait_seconds", default=10, min=1, help="--wait passed to iptables tools (xtables lock)."),
]

libvirt_opts = [
    cfg.StrOpt("uri", default="qemu:///system", help="libvirt connection URI."),
    cfg.StrOpt("provider_filter", default="nova-provider", help="Name of the provider nwfilter."),
    cfg.StrOpt("instance_filter_pattern", default="nova-instance-*",
               help="fnmatch pattern of instance filters that must reference the provider filter."),
    cfg.BoolOpt("ensure_filter_refs", default=False,
                help="On every refresh, add the provider filterref to instance filters missing it."),
    cfg.StrOpt("match_mode", default="auto", choices=["auto", "rules", "ipset"],
               help="How the provider nwfilter matches sources: one rule per CIDR, or host ipsets "
                    "that provfw keeps; 'auto' switches to ipsets past ipset_threshold rules."),
    cfg.IntOpt("ipset_threshold", default=256, min=1,
               help="Rule count past which match_mode=auto uses host ipsets."),
    cfg.StrOpt("ipset_prefix", default="pfn",
               help="Name prefix of the host ipsets the nwfilter driver keeps in ipset mode "
                    "(one hash:net set per family/protocol/port range, e.g. pfn4-tcp-1-65535). "
                    "Every set with this prefix belongs to the driver; at most 16 characters."),
]

conductor_opts = [
    cfg.IntOpt("max_delta_rules", default=20000, min=0,
               help="get_provider_fw_rules answers with the rules added and removed since the host's "
                    "generation when there are at most this many, otherwise with a full snapshot."),
    cfg.IntOpt("snapshot_cache_size", default=2, min=1,
               help="Compressed snapshots kept in memory (one per generation)."),
    cfg.IntOpt("delta_cache_size", default=64, min=0,
               help="Compressed deltas kept in memory (one per pair of generations)."),
    cfg.FloatOpt("generation_cache_ttl", default=1.0, min=0.0,
                 help="Seconds the conductor answers 'no change' from its cached generation before it reads "
                      "the generation from the database again."),
    cfg.IntOpt("purge_interval", default=60, min=1,
               help="Seconds between purges of expired rules (soft delete; hosts stop enforcing at expiry)."),
    cfg.FloatOpt("report_flush_interval", default=1.0, min=0.05,
                 help="Longest time a compute host's state report waits before the conductor writes it; "
                      "reports that change a host's generation or error are written within 50 ms, in batches."),
    cfg.StrOpt("compute_user_prefix", default="provfw-compute-",
               help="A compute host's bus user is this prefix followed by its host name; the conductor takes "
                    "the reporting host from the broker-validated AMQP user_id and rejects reports that claim "
                    "another host."),
    cfg.BoolOpt("trust_unverified_hosts", default=False,
                help="Accept state reports whose bus user is not a compute user (a shared bus user, or a "
                     "transport without users). Off: such reports are rejected and logged. The in-process "
                     "bus of provfw-all-in-one is always trusted."),
    cfg.FloatOpt("call_timeout", default=10.0, min=0.1,
                 help="Seconds a compute worker waits for a conductor's reply before retrying."),
    cfg.IntOpt("call_retries", default=2, min=0,
               help="Retries of a request to the conductor before the worker reports it unavailable."),
]

feeds_opts = [
    cfg.FloatOpt("poll_interval", default=10.0, min=0.05,
                 help="Seconds between a conductor's looks for feeds that are due. 'provfw feed sync' makes a "
                      "feed due at once, so this is also how long such a request waits at most."),
    cfg.IntOpt("min_interval", default=300, min=1,
               help="Shortest sync interval (seconds) a feed may be given; publishers ask for politeness "
                    "(Spamhaus: at most once an hour for DROP)."),
    cfg.IntOpt("retry_interval", default=300, min=1,
               help="Seconds until a feed whose sync failed is tried again (or its interval, if shorter)."),
    cfg.IntOpt("max_bytes", default=64 * 1024 * 1024, min=1024,
               help="Largest feed download in bytes (after any Content-Encoding is decoded); a larger one "
                    "fails the sync and keeps the last good list."),
    cfg.FloatOpt("connect_timeout", default=10.0, min=0.1, help="Seconds to connect to a feed's server."),
    cfg.FloatOpt("read_timeout", default=30.0, min=0.1,
                 help="Seconds a feed's server may stay silent during a download."),
    cfg.FloatOpt("fetch_timeout", default=120.0, min=1.0,
                 help="Seconds a whole feed download may take, however the server trickles it."),
    cfg.FloatOpt("replace_guard_fraction", default=0.5, min=0.0, max=1.0,
                 help="A replace-sync (a feed, or an import with mode=replace) that would remove more than this "
                      "share of its source's rules in force is refused and changes nothing, unless forced: a "
                      "truncated download must not unblock the world."),
    cfg.IntOpt("replace_guard_min_rules", default=10, min=1,
               help="The guard ignores a replace that removes fewer rules than this (a short list losing a "
                    "few entries is not a truncated download)."),
]

rabbit_opts = [
    cfg.BoolOpt("ssl", default=False, help="Connect to RabbitMQ over TLS (as oslo.messaging's option)."),
    cfg.StrOpt("ssl_ca_file", default=None, help="CA bundle that signs the brokers' certificates."),
    cfg.StrOpt("ssl_cert_file", default=None, help="Client certificate (for brokers that require one)."),
    cfg.StrOpt("ssl_key_file", default=None, help="Private key of the client certificate."),
    cfg.BoolOpt("ssl_check_hostname", default=True,
                help="Check that each broker's certificate is for the host transport_url names for it (an IP "
                     "address must be in the certificate's subjectAltName), on failover too. Off: the chain is "
                     "still checked against ssl_ca_file, but a certificate that CA signed for any other host is "
                     "accepted too. kombu turns the name 'localhost' into 127.0.0.1, so such a broker's "
                     "certificate needs the entry IP:127.0.0.1."),
]

sets_opts = [
    cfg.IntOpt("min_set_size", default=65536, min=1024, help="Smallest maxelem given to a kernel set."),
    cfg.FloatOpt("headroom", default=2.0, min=1.1, help="Set size = max(min_set_size, entries * headroom)."),
    cfg.IntOpt("full_rebuild_delta", default=20000, min=1,
               help="A delta with more changes than this is applied as a full rebuild."),
]


def list_opts():
    return [
        ("DEFAULT", default_opts),
        ("database", database_opts),
        ("api", api_opts),
        ("compute", compute_opts),
        ("iptables", iptables_opts),
        ("libvirt", libvirt_opts),
        ("sets", sets_opts),
        ("conductor", conductor_opts),
        ("feeds", feeds_opts),
        ("oslo_messaging_rabbit", rabbit_opts),
        ("metrics", metrics_opts),
    ]


def register_opts(conf: cfg.ConfigOpts = CONF) -> None:
    """provfw's options and oslo.log's (``debug``, ``log_file``, ``use_json``, ``use_journal``...)."""
    for group, opts in list_opts():
        conf.register_opts(opts, group=None if group == "DEFAULT" else group)
    oslo_log.register_options(conf)


register_opts()


def _config_files_in(argv) -> list[str]:
    """The ``--config-file`` paths of a command line, in order."""
    files, args = [], list(argv)
    for index, arg in enumerate(args):
        if arg == "--config-file" and index + 1 < len(args):
            files.append(args[index + 1])
        elif arg.startswith("--config-file="):
            files.append(arg.split("=", 1)[1])
    return files


def parse_args(argv=None, conf: cfg.ConfigOpts = CONF, default_config_files=None) -> cfg.ConfigOpts:
    """Parse command line + config files (``--config-file``; default /etc/provfw/provfw.conf if present).

    Raises oslo.config's errors, and ConfigError for a malformed value of an option that is also a command-line
    option (``debug``...): oslo.config prints those itself and exits 1, which here becomes the same one line
    as every other bad value.  Usage errors and ``--help`` exit as argparse makes them.
    """
    if default_config_files is None:
        default_config_files = [p for p in ("/etc/provfw/provfw.conf",) if os.path.exists(p)]
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            conf(argv, project="provfw", default_config_files=default_config_files)
    except SystemExit as exc:
        said = errors.getvalue().strip()
        bad = re.fullmatch(r"argument --([\w-]+): (.+)", said)
        if exc.code == 1 and bad:          # oslo.config's _validate_cli_options
            option = bad.group(1).replace("-", "_")
            files = ", ".join(os.path.abspath(path) for path in
                              _config_files_in(argv if argv is not None else sys.argv[1:]) or default_config_files)
            source = f" in {files}" if files else ""
            raise exception.ConfigError(f"[DEFAULT] {option}{source} is not valid: {bad.group(2)}") from None
        sys.stderr.write(errors.getvalue())
        raise
    sys.stderr.write(errors.getvalue())
    return conf


def check_values(conf: cfg.ConfigOpts = CONF) -> None:
    """Read every registered option once; cfg.Error naming the option and its file when a value is malformed.

    oslo.config converts a value when it is first read, so without this a bad ``bind_port`` or an unknown choice
    would fail whichever request or loop read it first, long after the daemon started.  ``use_journal`` needs
    the systemd bindings, which oslo.log only finds missing with a traceback: ConfigError says so here.
    """
    def read(group: str | None, option: str):
        try:
            return (conf[group] if group else conf)[option]
        except cfg.ConfigFileValueError as exc:
            # oslo.config's text names the option's location as a LocationInfo repr: say it as people do.
            where = re.search(r"detail='([^']*)'", str(exc))
            source = f" in {where.group(1)}" if where else ""
            reason = str(exc).split(" is not valid: ", 1)[-1]
            raise exception.ConfigError(f"[{group or 'DEFAULT'}] {option}{source} is not valid: {reason}") from None
        except (cfg.NoSuchOptError, cfg.NoSuchGroupError, cfg.TemplateSubstitutionError) as exc:
            # A registered option read as missing: its value names ($other or ${group.other}) an option that
            # is not there, and oslo.config reports the option read instead of the one named.
            named = exc.__context__ or exc
            if isinstance(named, cfg.NoSuchOptError):
                # oslo.config looks a bare $name up in the option's own group: say it as it was written.
                other = named.group.name if named.group is not None else None
                what = (f"${named.opt_name}" if other in (None, group) else "${" + f"{other}.{named.opt_name}" + "}") \
                    + ", which is no option"
            elif isinstance(named, cfg.NoSuchGroupError):
                what = f"the group [{named.group_name}], which does not exist"
            else:
                what = f"what oslo.config could not substitute ({named or exc})"
            files = ", ".join(os.path.abspath(path) for path in conf.config_file or [])   # (as oslo.config's own)
            source = f" in {files}" if files else ""
            raise exception.ConfigError(
                f"[{group or 'DEFAULT'}] {option}{source} is not valid: it refers to {what} "
                "(write $$ for a literal $)") from None

    for name in conf:                                    # options of [DEFAULT] and the names of groups
        value = read(None, name)
        if isinstance(value, cfg.ConfigOpts.GroupAttr):
            for option in value:
                read(name, option)
    if conf.use_journal:
        try:
            import systemd.journal  # noqa: F401 - only whether it imports
        except ImportError:
            raise exception.ConfigError("use_journal = true needs the systemd bindings: install the 'journal' "
                                        "extra (pip install 'provfw[journal]'; building systemd-python needs "
                                        "libsystemd-dev and pkg-config), or log to stdout, which journald "
                                        "captures under systemd") from None


CONFIG_FILE_ENV = "PROVFW_CONFIG_FILE"


def config_files_from_env(environ=os.environ) -> list[str]:
    """The configuration files named by ``$PROVFW_CONFIG_FILE`` (comma separated), in order; [] when unset.

    For processes whose command line belongs to someone else (a WSGI server).
    """
    return [path.strip() for path in environ.get(CONFIG_FILE_ENV, "").split(",") if path.strip()]


def database_url(conf: cfg.ConfigOpts = CONF) -> str:
    if conf.database.connection:
        return conf.database.connection
    os.makedirs(conf.state_path, exist_ok=True)
    return "sqlite:///" + os.path.join(conf.state_path, "provfw.sqlite")


def lock_dir(conf: cfg.ConfigOpts = CONF) -> str:
    path = conf.compute.lock_path or conf.state_path
    os.makedirs(path, exist_ok=True)
    return path


# The generator's settings; etc/provfw/provfw-config-generator.conf holds the same (a unit test compares).
# oslo.log's options (log file, journald, syslog, JSON) are provfw's too, so the sample shows them.
GENERATOR_NAMESPACES = ("provfw", "oslo.log")


def sample_config() -> str:
    """The sample configuration file, as ``oslo-config-generator --namespace provfw --namespace oslo.log``.

    Goes through the installed ``oslo.config.opts`` entry point, exactly as
    the standard tool does.  Raises ConfigError when that entry point is not
    installed (a source tree that was never ``pip install``-ed), because the
    generator would otherwise print a sample without a single option.
    """
    from oslo_config import generator  # imported here: the daemons never render samples

    for namespace in GENERATOR_NAMESPACES:
        if not importlib.metadata.entry_points(group="oslo.config.opts", name=namespace):
            raise exception.ConfigError(f"the oslo.config.opts entry point {namespace!r} is not installed; "
                                        "install provfw (pip install .) to render the sample")
    gen_conf = cfg.ConfigOpts()
    generator.register_cli_opts(gen_conf)
    gen_conf([arg for namespace in GENERATOR_NAMESPACES for arg in ("--namespace", namespace)],
             project="provfw-config-generator", default_config_files=[])
    out = io.StringIO()
    generator.generate(gen_conf, output_file=out)
    return out.getvalue()
