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
# Scratch objects of check plans (``check_provider_fw_rules``).  The chain and
# the table are only ever written in test/check mode (``iptables-restore
# --test``, ``nft -c``), which commits nothing; a scratch ipset is created,
# filled and destroyed by the same check.
CHECK_CHAIN = "provfw-check"
NFT_CHECK_TABLE = "provfw_check"
SCRATCH_SET_TAG = "check"


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
        digest = hashlib.sha256(name.encode()).hexdigest()
        head = f"{prefix}{family}-{protocol}-"
        # Ten hex digits when they fit; a long prefix gets fewer, never a name past the limit.
        room = max(6, min(10, IPSET_NAME_MAX - len(head) - len(suffix)))
        name = f"{head}{digest[:room]}{suffix}"
    return check_set_name(name)


def scratch_set_name(prefix: str, family: int) -> str:
    """The scratch set of a check plan: ``pfw4-check``.

    It carries the owner's prefix and family marker, so whoever owns
    ``prefix`` destroys it if a check ever left it behind; ``check`` is no
    protocol, so it never collides with a group's set.
    """
    return check_set_name(f"{prefix}{family}-{SCRATCH_SET_TAG}")
