"""Cedar's version, as `cedar --version` and the `cedar_build_info` metric report it."""

__version__ = "0.1.0"
