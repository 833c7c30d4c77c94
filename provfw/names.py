"""Kernel object names owned by provfw, and the kernel's limits on them.

Every chain, set, table and comment provfw writes is named here, so a rename
is one change and a too-long name fails at start-up rather than half way
through an apply.
"""

from __future__ import annotations

import hashlib

from provfw import exception

CHAIN_NAME_MAX = 28      # iptables: XT_EXTENSION_MAXNAMELEN - 1 (29 - 1)
IPSET_NAME_MAX = 31      # IPSET_MAXNAMELEN - 1
NFT_NAME_MAX = 255
COMMENT_PREFIX = "provfw:"
JUMP_COMMENT = COMMENT_PREFIX + "jump"
NFT_TABLE = "provfw"


def check_chain_name(name: str) -> str:
    if not name or len(name) > CHAIN_NAME_MAX or " " in name:
        raise exception.ConfigError(f"chain name {name!r} must be 1-{CHAIN_NAME_MAX} characters without spaces")
    return name


def check_set_name(name: str) -> str:
    if not name or len(name) > IPSET_NAME_MAX or " " in name:
        raise exception.ConfigError(f"ipset name {name!r} must be 1-{IPSET_NAME_MAX} characters without spaces")
    return name


def rule_comment(*parts) -> str:
    """A deterministic comment that identifies a rendered rule (Felix-style hash).

    Diffing the kernel against the desired state compares these comments, so a
    different iptables-save spelling of the same rule never causes a rewrite.
    """
    digest = hashlib.sha256("|".join(str(p) for p in parts).encode()).hexdigest()[:16]
    return COMMENT_PREFIX + digest


def set_name(prefix: str, family: int, protocol: str, from_port: int, to_port: int, suffix: str = "") -> str:
    """Name of the kernel set holding one (family, protocol, port range) group.

    Stays within IPSET_NAME_MAX: ``pfw4-tcp-1-65535`` for readable groups, a
    hash for anything longer.  ``suffix`` is ``-t`` for the temporary set of a
    swap rebuild.
    """
    ports = "any" if from_port < 0 else (f"{from_port}" if from_port == to_port else f"{from_port}-{to_port}")
    name = f"{prefix}{family}-{protocol}-{ports}{suffix}"
    if len(name) > IPSET_NAME_MAX:
        digest = hashlib.sha256(name.encode()).hexdigest()[:10]
        name = f"{prefix}{family}-{protocol}-{digest}{suffix}"
    return check_set_name(name)
