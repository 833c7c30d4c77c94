"""``provfw.conf.check_values``: every option read once at start, so a bad value fails there, named."""

from __future__ import annotations

import sys

import pytest
from oslo_config import cfg

from provfw import conf as provfw_conf
from provfw import exception


@pytest.fixture
def opts(tmp_path):
    def parse(text: str) -> cfg.ConfigOpts:
        path = tmp_path / "provfw.conf"
        path.write_text(text)
        conf = cfg.ConfigOpts()
        provfw_conf.register_opts(conf)
        provfw_conf.parse_args(["--config-file", str(path)], conf=conf, default_config_files=[])
        return conf
    return parse


def test_a_valid_file_passes_and_every_group_is_read(opts):
    provfw_conf.check_values(opts("[compute]\nfirewall_driver = noop\n[feeds]\nmax_bytes = 2048\n"))


@pytest.mark.parametrize("text, named", [
    ("[feeds]\nmax_bytes = lots\n", "[feeds] max_bytes"),
    ("[feeds]\nmax_bytes = 12\n", "[feeds] max_bytes"),                    # below its minimum of 1024
    ("[libvirt]\nmatch_mode = sometimes\n", "[libvirt] match_mode"),
    ("[DEFAULT]\nmax_rules = 0\n", "[DEFAULT] max_rules"),
])
def test_a_bad_value_in_any_group_is_a_config_error_naming_it_and_its_file(opts, text, named, tmp_path):
    with pytest.raises(exception.ConfigError) as failure:
        provfw_conf.check_values(opts(text))
    assert str(failure.value).startswith(f"{named} in {tmp_path}/provfw.conf is not valid: "), failure.value


def test_use_journal_without_the_systemd_bindings_says_which_extra_to_install(opts, monkeypatch):
    monkeypatch.setitem(sys.modules, "systemd.journal", None)          # what Python does for a missing module
    with pytest.raises(exception.ConfigError, match=r"install the 'journal' extra \(pip install 'provfw\[journal\]'"):
        provfw_conf.check_values(opts("[DEFAULT]\nuse_journal = true\n"))


@pytest.mark.parametrize("text, said", [
    # oslo.config names the option read, "no such option state_path", instead of the one its value names.
    ("[DEFAULT]\nstate_path = $nosuchvar/x\n", "[DEFAULT] state_path in {file} is not valid: it refers to "
                                               "$nosuchvar, which is no option (write $$ for a literal $)"),
    ("[api]\nbind_host = ${nosuch.host}\n", "[api] bind_host in {file} is not valid: it refers to the group "
                                            "[nosuch], which does not exist (write $$ for a literal $)"),
])
def test_a_value_naming_an_option_that_does_not_exist_says_which(opts, text, said, tmp_path):
    with pytest.raises(exception.ConfigError) as failure:
        provfw_conf.check_values(opts(text))
    assert str(failure.value) == said.format(file=tmp_path / "provfw.conf")


def test_a_literal_dollar_written_twice_is_read_as_one(opts):
    conf = opts("[DEFAULT]\nstate_path = /srv/$$provfw\n")
    provfw_conf.check_values(conf)
    assert conf.state_path == "/srv/$provfw"


def test_a_bad_value_of_an_option_that_is_also_on_the_command_line_is_the_same_config_error(opts, tmp_path, capsys):
    # oslo.config checks those (debug, use_json...) itself while parsing: it printed its own line, without the
    # file, and exited 1, where every other bad value is a ConfigError that the daemons print and exit 2 on.
    with pytest.raises(exception.ConfigError) as failure:
        opts("[DEFAULT]\ndebug = maybe\n")
    assert str(failure.value) == (f"[DEFAULT] debug in {tmp_path}/provfw.conf is not valid: "
                                  "Invalid Boolean value: maybe")
    assert capsys.readouterr().err == ""


def test_usage_errors_still_exit_as_argparse_makes_them(capsys):
    conf = cfg.ConfigOpts()
    provfw_conf.register_opts(conf)
    with pytest.raises(SystemExit) as stopped:
        provfw_conf.parse_args(["--no-such-flag"], conf=conf, default_config_files=[])
    assert stopped.value.code == 2 and "unrecognized arguments: --no-such-flag" in capsys.readouterr().err


def test_a_file_named_relative_is_said_absolute_as_oslo_config_says_it(tmp_path, monkeypatch):
    # Found by a newcomer: these two said "in a.conf" where every other bad value says the absolute path.
    monkeypatch.chdir(tmp_path)
    for name, text in (("a.conf", "[DEFAULT]\ndebug = maybe\n"), ("b.conf", "[DEFAULT]\nstate_path = $x/y\n")):
        (tmp_path / name).write_text(text)
        conf = cfg.ConfigOpts()
        provfw_conf.register_opts(conf)
        with pytest.raises(exception.ConfigError, match=f" in {tmp_path}/{name} is not valid: "):
            provfw_conf.parse_args(["--config-file", name], conf=conf, default_config_files=[])
            provfw_conf.check_values(conf)
