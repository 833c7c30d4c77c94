"""The shipped sample configuration documents every option as declared."""

import os

from provfw import conf

SAMPLE = os.path.join(os.path.dirname(__file__), "..", "..", "etc", "provfw", "provfw.conf.sample")


def test_sample_config_matches_the_declared_options():
    with open(SAMPLE) as handle:
        shipped = handle.read()
    assert shipped == conf.sample_config(), "regenerate with: provfw-manage config sample > etc/provfw/provfw.conf.sample"


def test_every_option_has_help_text():
    for group, opts in conf.list_opts():
        for opt in opts:
            assert opt.help, f"[{group}] {opt.name} has no help text"
