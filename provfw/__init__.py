"""provfw: a provider-level firewall for clouds."""

# The one place the version is written; setup.cfg reads it (version = attr: provfw.__version__).
__version__ = "0.1.0"
