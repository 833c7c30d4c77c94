"""provfw-all-in-one: API + conductor + one compute worker in one process, on embedded defaults.

SQLite under ``state_path``, the in-process bus (``memory://``), the schema
migrated at start, and - when no token exists yet - a bootstrap admin token
written to ``<state_path>/admin-token`` (mode 0600) for the ``provfw`` CLI.
The worker reaches the database only through the in-process conductor, as
it would on a real hypervisor.  One metrics endpoint (``[metrics]
api_port``) serves the API's, the conductor's and the worker's metrics.
systemd hears READY=1 once the API listens and the worker's first full
apply succeeded; the watchdog watches the conductor's server and the
worker's consumer and periodic check.
"""

from provfw.cmd import eventlet_patch  # noqa: F401  (must come first)

import contextlib  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import secrets  # noqa: E402
import threading  # noqa: E402

from provfw import conf as provfw_conf  # noqa: E402
from provfw import exception, metrics, systemd  # noqa: E402
from provfw.cmd import api as api_cmd  # noqa: E402
from provfw.cmd import common  # noqa: E402
from provfw.compute import api as compute_api  # noqa: E402
from provfw.compute import service  # noqa: E402
from provfw.conductor import service as conductor_service  # noqa: E402
from provfw.db import api as db  # noqa: E402
from provfw.db import migration  # noqa: E402

LOG = logging.getLogger("provfw.all_in_one")


BOOTSTRAP_TOKEN_NAME = "bootstrap-admin"


def _read_token_file(path: str) -> str | None:
    try:
        with open(path) as handle:
            secret = handle.read().strip()
    except FileNotFoundError:
        return None
    return secret or None


def _write_token_file(path: str, secret: str) -> None:
    """Write ``secret`` to ``path`` (mode 0600) atomically: a crash leaves the old file or the new one, never
    half of one."""
    directory = os.path.dirname(path)
    tmp = os.path.join(directory, f".admin-token.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(secret + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def bootstrap_token(conf) -> str | None:
    """Give the admin a token on first start: ``<state_path>/admin-token`` (mode 0600), whatever the database.

    The file is written first (atomically) and its secret's hash stored after, so a start that fails in
    between leaves a file whose token the next start stores; the admin is never left without one.  A token
    is made only while the database has no active admin token (a fresh database, or one whose admins were
    all revoked); a file whose token was never stored is kept and its token stored, one whose token was
    revoked is replaced.  Returns the path of the file holding a working admin token, or None when the
    database already has admins and the file (if any) is not one of them.
    """
    os.makedirs(conf.state_path, mode=0o700, exist_ok=True)
    path = os.path.join(conf.state_path, "admin-token")
    secret = _read_token_file(path)
    if secret is not None:
        known = db.api_token_get_by_secret(secret, include_revoked=True)
        if known is not None and known.revoked_at is None:
            return path
        if known is not None:
            secret = None      # revoked: that secret is spent and is never stored again
    tokens = db.api_token_get_all()
    if any(t.role == "admin" and t.revoked_at is None for t in tokens):
        if secret is not None:
            LOG.warning("%s holds a token this database does not know; it was left as it is. Create one with "
                        "'provfw-manage token create --name NAME --role admin'", path)
        return None
    if secret is None:
        secret = db.new_token_secret()
        _write_token_file(path, secret)
    taken = {t.name for t in tokens}
    name = BOOTSTRAP_TOKEN_NAME
    while name in taken:    # a revoked bootstrap token keeps its name
        name = f"{BOOTSTRAP_TOKEN_NAME}-{secrets.token_hex(3)}"
    try:
        db.api_token_create(name, "admin", secret=secret)
    except exception.InvalidInput:
        # The file holds something that is no secret of ours (edited by hand?): replace it.
        LOG.warning("%s does not hold a provfw token secret; writing a new one", path)
        secret = db.new_token_secret()
        _write_token_file(path, secret)
        db.api_token_create(name, "admin", secret=secret)
    LOG.info("created the bootstrap admin token %r; it is in %s (the provfw CLI reads it from there)", name, path)
    return path


def main(argv=None) -> None:
    common.prepare(argv)
    conf = common.CONF
    migration.db_sync(provfw_conf.database_url(conf))
    bootstrap_token(conf)
    metrics.serve_configured(conf, "api_port", metrics.API, metrics.CONTROL, metrics.CONDUCTOR, metrics.WORKER,
                             what="provfw-all-in-one")
    watchdog = systemd.Watchdog()
    compute = compute_api.ComputeAPI(conf)
    conductor = conductor_service.ConductorService(conf, compute, watchdog=watchdog)
    conductor.start()
    conductor.ready.wait(10)
    worker = service.ComputeService(conf, watchdog=watchdog)
    worker.start()
    stop = threading.Event()

    def announce_when_ready() -> None:
        while not worker.ready.wait(1.0):
            if stop.is_set():
                return
            systemd.notify(f"STATUS=waiting for the first apply: {worker.manager.last_error or 'in progress'}")
        systemd.notify("READY=1", f"STATUS=serving on http://{conf.api.bind_host}:{conf.api.bind_port}")
        watchdog.start()

    def listening() -> None:
        threading.Thread(target=announce_when_ready, name="systemd-ready", daemon=True).start()

    try:
        api_cmd.serve(conf, compute, stop, on_listening=listening)
    finally:
        stop.set()
        watchdog.stop()
        worker.stop()
        conductor.stop()


if __name__ == "__main__":
    main()
