"""Drivers by name: the entry points setup.cfg declares, or a dotted path to a class.

``[compute] compute_driver`` and ``[compute] firewall_driver`` name a driver
the way Nova and Neutron name theirs: an entry point of the namespace
(``provfw.compute_drivers``, ``provfw.firewall_drivers``), loaded by
stevedore, so a driver shipped in another distribution plugs in by
declaring an entry point, with no change to provfw.  A dotted path to a
class (``pkg.module.Class`` or ``pkg.module:Class``) is still accepted for
drivers that are not packaged.

An entry point name wins over a dotted path; entry point names carry no dots.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from typing import Any

from stevedore import driver as stevedore_driver
from stevedore import exception as stevedore_exception

from provfw import exception


def available(namespace: str) -> list[str]:
    """The entry point names installed in ``namespace``, sorted, each once."""
    return sorted({ep.name for ep in importlib.metadata.entry_points(group=namespace)})


def driver_class(namespace: str, name: str) -> type:
    """The class that ``name`` designates in ``namespace`` (see the module doc).

    Raises ConfigError naming ``name`` when it is neither an installed entry
    point nor an importable dotted path (the message lists the entry points of
    the namespace), when its module cannot be imported (e.g. an optional
    dependency is missing), or when two distributions declare the same name.
    """
    names = available(namespace)
    if name in names:
        try:
            return stevedore_driver.DriverManager(namespace, name, invoke_on_load=False,
                                                  on_load_failure_callback=_load_failed).driver
        except stevedore_exception.MultipleMatches as exc:
            raise exception.ConfigError(f"{namespace} {name!r} is declared more than once: {exc}") from None
        except stevedore_exception.NoMatches:
            # stevedore reads a namespace once per process; a distribution installed since is not seen.
            pass
    if "." in name or ":" in name:
        return _import_dotted(namespace, name)
    raise exception.ConfigError(f"unknown {namespace} {name!r}: not an installed entry point "
                                f"(available: {', '.join(names) or 'none'}) nor a dotted path to a class")


def load_driver(namespace: str, name: str, **kwargs: Any) -> Any:
    """An instance of :func:`driver_class` ``(namespace, name)`` built with ``kwargs``.

    ConfigError as for :func:`driver_class`; what the driver's constructor
    raises is passed on unchanged.
    """
    return driver_class(namespace, name)(**kwargs)


def _load_failed(manager, entry_point: importlib.metadata.EntryPoint, error: BaseException) -> None:
    # stevedore would otherwise log the import error and answer "no such driver".
    raise exception.ConfigError(f"cannot load {entry_point.group} {entry_point.name!r} "
                                f"({entry_point.value}): {error}") from error


def _import_dotted(namespace: str, path: str) -> type:
    module_name, sep, attr = path.partition(":") if ":" in path else path.rpartition(".")
    if not module_name or not attr:
        raise exception.ConfigError(f"{namespace} {path!r} is not a dotted path to a class")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise exception.ConfigError(f"cannot load {namespace} {path!r}: {exc}") from None
