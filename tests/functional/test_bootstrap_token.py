"""provfw-all-in-one's bootstrap admin token on every database, with a state directory that does not exist yet.

The all-in-one used to create the state directory only for SQLite (FileNotFoundError on PostgreSQL) and to
store the token before writing its file, so a start that failed in between left a database with an admin
token nobody had, and every later start skipped writing one.
"""

from __future__ import annotations

import os
import stat

import pytest

from provfw.cmd import all_in_one
from provfw.db import api as db

pytestmark = pytest.mark.functional


@pytest.fixture
def state(conf, tmp_path):
    path = tmp_path / "not" / "yet" / "state"
    conf.set_override("state_path", str(path))
    return path


def token_file(state) -> str:
    return (state / "admin-token").read_text().strip()


def test_first_start_creates_the_state_directory_and_a_working_admin_token_file(conf, any_db, state):
    assert not state.exists()
    path = all_in_one.bootstrap_token(conf)
    assert path == str(state / "admin-token")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(state).st_mode) == 0o700
    token = db.api_token_get_by_secret(token_file(state))
    assert token is not None and token.role == "admin" and token.name == "bootstrap-admin"
    assert [name for name in os.listdir(state)] == ["admin-token"]      # no temporary file left behind


def test_a_second_start_keeps_the_token_and_makes_no_other(conf, any_db, state):
    all_in_one.bootstrap_token(conf)
    first = token_file(state)
    assert all_in_one.bootstrap_token(conf) == str(state / "admin-token")
    assert token_file(state) == first
    assert [t.name for t in db.api_token_get_all()] == ["bootstrap-admin"]


def test_a_start_that_fails_after_the_file_is_written_is_completed_by_the_next(conf, any_db, state, monkeypatch):
    def database_gone(*args, **kwargs):
        raise ConnectionError("the database went away between the file and the token")

    with monkeypatch.context() as patch:
        patch.setattr(db, "api_token_create", database_gone)
        with pytest.raises(ConnectionError):
            all_in_one.bootstrap_token(conf)
    written = token_file(state)
    assert db.api_token_get_all() == []                     # nothing stored: the old code's trap

    all_in_one.bootstrap_token(conf)                        # the next start
    assert token_file(state) == written                     # the admin keeps the token already handed out
    assert db.api_token_get_by_secret(written).role == "admin"


def test_a_database_that_has_an_admin_gets_no_bootstrap_token(conf, any_db, state):
    db.api_token_create("alice", "admin")
    assert all_in_one.bootstrap_token(conf) is None
    assert not (state / "admin-token").exists()
    assert [t.name for t in db.api_token_get_all()] == ["alice"]


def test_a_revoked_bootstrap_token_is_replaced_by_a_new_secret_never_revived(conf, any_db, state):
    all_in_one.bootstrap_token(conf)
    revoked = token_file(state)
    db.api_token_revoke("bootstrap-admin")
    all_in_one.bootstrap_token(conf)
    fresh = token_file(state)
    assert fresh != revoked
    assert db.api_token_get_by_secret(revoked) is None
    token = db.api_token_get_by_secret(fresh)
    assert token.role == "admin" and token.name.startswith("bootstrap-admin-")


def test_a_token_file_that_holds_no_secret_of_ours_is_replaced(conf, any_db, state):
    state.mkdir(parents=True)
    (state / "admin-token").write_text("not a token\n")
    all_in_one.bootstrap_token(conf)
    assert db.api_token_get_by_secret(token_file(state)).role == "admin"
