"""Drivers are loaded by name from the entry points setup.cfg declares, or by dotted path."""

from __future__ import annotations

import configparser
import importlib.metadata
import os

import pytest
import stevedore.extension

from provfw import exception, plugins
from provfw.virt import driver as virt_driver
from provfw.virt import firewall

SETUP_CFG = os.path.join(os.path.dirname(__file__), "..", "..", "setup.cfg")
NAMESPACES = ("provfw.compute_drivers", "provfw.firewall_drivers")


class RecordingDriver(firewall.FirewallDriver):
    """A driver no entry point declares: reachable only by its dotted path."""

    def __init__(self, **kwargs):
        self.kwargs = kwargs


def declared(namespace: str) -> dict[str, str]:
    parser = configparser.ConfigParser()
    parser.optionxform = str        # entry point names are case-sensitive (IptablesFirewallDriver)
    parser.read(SETUP_CFG)
    lines = parser["options.entry_points"][namespace].strip().splitlines()
    return {name.strip(): target.strip() for name, _, target in (line.partition("=") for line in lines)}


@pytest.mark.parametrize("namespace", NAMESPACES)
def test_the_installed_entry_points_are_the_ones_setup_cfg_declares(namespace):
    installed = {ep.name: ep.value for ep in importlib.metadata.entry_points(group=namespace)}
    assert installed == declared(namespace), "setup.cfg changed since the install: pip install -e ."


@pytest.mark.parametrize("namespace,name", [(ns, name) for ns in NAMESPACES for name in sorted(declared(ns))])
def test_every_declared_driver_name_loads_a_class(namespace, name):
    cls = plugins.driver_class(namespace, name)
    assert isinstance(cls, type) and cls.__name__ == declared(namespace)[name].rpartition(":")[2]


def test_firewall_driver_by_entry_point_name(conf):
    conf.set_override("firewall_driver", "noop", "compute")
    assert type(firewall.load_firewall_driver(conf)).__name__ == "NoopFirewallDriver"


def test_firewall_driver_by_the_seeds_class_name(conf):
    conf.set_override("firewall_driver", "IptablesFirewallDriver", "compute")
    driver = firewall.load_firewall_driver(conf)
    assert type(driver).__name__ == "IptablesFirewallDriver" and driver.conf is conf


def test_compute_driver_by_entry_point_name_and_by_class_name(conf):
    for name in ("fake", "FakeConnection"):
        conf.set_override("compute_driver", name, "compute")
        assert type(virt_driver.load_compute_driver(conf)).__name__ == "FakeConnection"


@pytest.mark.parametrize("path", [f"{__name__}.RecordingDriver", f"{__name__}:RecordingDriver"])
def test_a_dotted_path_to_a_class_is_accepted_and_gets_the_keyword_arguments(conf, path):
    conf.set_override("firewall_driver", path, "compute")
    driver = firewall.load_firewall_driver(conf, get_connection=len)
    assert isinstance(driver, RecordingDriver) and driver.kwargs == {"conf": conf, "get_connection": len}


def test_an_unknown_name_is_a_config_error_that_names_it_and_lists_the_entry_points(conf):
    conf.set_override("firewall_driver", "ipfw", "compute")
    with pytest.raises(exception.ConfigError) as err:
        firewall.load_firewall_driver(conf)
    message = err.value.message
    assert "'ipfw'" in message
    for name in ("iptables", "ipset", "nftables", "iptc", "nwfilter", "noop"):
        assert name in message


def test_an_unknown_compute_driver_lists_the_compute_entry_points(conf):
    conf.set_override("compute_driver", "xen", "compute")
    with pytest.raises(exception.ConfigError) as err:
        virt_driver.load_compute_driver(conf)
    assert "'xen'" in err.value.message and "libvirt" in err.value.message and "fake" in err.value.message


@pytest.mark.parametrize("path", ["provfw.no_such_module.Driver", f"{__name__}.NoSuchDriver", "trailing."])
def test_a_dotted_path_that_does_not_import_is_a_config_error_naming_it(path):
    with pytest.raises(exception.ConfigError) as err:
        plugins.load_driver("provfw.firewall_drivers", path)
    assert repr(path) in err.value.message


def test_an_entry_point_whose_module_fails_to_import_is_a_config_error_naming_it(tmp_path, monkeypatch):
    # A real distribution on sys.path whose driver does not import, as when an optional extra is missing.
    dist_info = tmp_path / "broken_driver-1.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-driver\nVersion: 1.0\n")
    (dist_info / "entry_points.txt").write_text("[provfw.firewall_drivers]\nbroken = provfw_no_such_module:Driver\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    # stevedore reads each namespace once per process; start from what a fresh process would see.
    monkeypatch.setattr(stevedore.extension.ExtensionManager, "ENTRY_POINT_CACHE", {})
    with pytest.raises(exception.ConfigError) as err:
        plugins.load_driver("provfw.firewall_drivers", "broken")
    assert "'broken'" in err.value.message and "provfw_no_such_module" in err.value.message


def test_a_driver_constructor_error_is_passed_on_unchanged():
    with pytest.raises(TypeError):
        plugins.load_driver("provfw.firewall_drivers", "noop", unexpected=1)


@pytest.mark.parametrize("name", sorted(n for n in declared("provfw.firewall_drivers") if n[0].islower()))
def test_the_stop_line_says_the_kernel_keeps_rules_only_for_a_driver_that_enforces(conf, name):
    # The noop driver's all-in-one used to log "the kernel keeps the rules it enforces" on SIGTERM.
    conf.set_override("firewall_driver", name, "compute")
    firewall_driver = firewall.load_firewall_driver(conf)
    compute = virt_driver.FirewallComputeDriver()
    compute.firewall_driver = firewall_driver
    if name == "noop":
        assert compute.after_stop() == "nothing was enforced (the noop firewall driver)"
    else:
        assert compute.after_stop() == "the kernel keeps the rules last applied"


def test_the_fake_compute_drivers_stop_line_says_it_enforced_nothing(conf):
    conf.set_override("compute_driver", "fake", "compute")
    assert "nothing is enforced" in virt_driver.load_compute_driver(conf).after_stop()
