"""The shipped sample configuration is what oslo-config-generator renders from the declared options."""

import io
import os
import socket

from oslo_config import cfg, generator

from provfw import conf

ETC = os.path.join(os.path.dirname(__file__), "..", "..", "etc", "provfw")
SAMPLE = os.path.join(ETC, "provfw.conf.sample")
GENERATOR_CONF = os.path.join(ETC, "provfw-config-generator.conf")
REGENERATE = ("regenerate with: oslo-config-generator --config-file etc/provfw/provfw-config-generator.conf "
              "> etc/provfw/provfw.conf.sample (after pip install -e . if setup.cfg changed)")


def generator_output(config_file: str) -> str:
    """What ``oslo-config-generator --config-file config_file`` prints."""
    gen_conf = cfg.ConfigOpts()
    generator.register_cli_opts(gen_conf)
    gen_conf(["--config-file", config_file], default_config_files=[])
    out = io.StringIO()
    generator.generate(gen_conf, output_file=out)
    return out.getvalue()


def shipped() -> str:
    with open(SAMPLE) as handle:
        return handle.read()


def test_the_committed_sample_is_the_generators_output():
    assert shipped() == generator_output(GENERATOR_CONF), REGENERATE


def test_provfw_manage_config_sample_prints_the_generators_output():
    assert conf.sample_config() == generator_output(GENERATOR_CONF)


def test_every_declared_group_and_option_is_in_the_sample():
    text = shipped()
    for group, opts in conf.list_opts():
        assert f"\n[{group}]\n" in "\n" + text, f"[{group}] is missing from the sample"
        for opt in opts:
            assert f"\n#{opt.dest} =" in text, f"[{group}] {opt.dest} is missing from the sample"


def test_host_specific_defaults_render_as_placeholders():
    # A sample generated on another machine (or by another user) must be byte-identical.
    text = shipped()
    assert "#host = <hostname>" in text and "#state_path = <home>/.local/state/provfw" in text
    assert os.path.expanduser("~/.local/state/provfw") not in text
    assert f"#host = {socket.gethostname()}\n" not in text


def test_every_option_has_help_text():
    for group, opts in conf.list_opts():
        for opt in opts:
            assert opt.help, f"[{group}] {opt.name} has no help text"
