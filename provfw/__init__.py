"""provfw: a provider-level firewall for clouds."""

# The one place the version is written; setup.cfg reads it (version = attr: provfw.__version__).
__version__ = "0.1.0"

import os as _os

#: The environment variable that moves provfw's state directory, read by the daemons (as the default of
#: ``[DEFAULT] state_path``) and by the ``provfw`` CLI (where it finds the all-in-one's admin token).
STATE_PATH_ENV = "PROVFW_STATE_PATH"


def default_state_path() -> str:
    """``$PROVFW_STATE_PATH``, else ``~/.local/state/provfw`` of the user running provfw (XDG's state
    directory)."""
    return _os.environ.get(STATE_PATH_ENV) or _os.path.expanduser("~/.local/state/provfw")
