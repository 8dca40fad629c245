"""fdmig: hand live socket connections from one process to another."""

__version__ = "0.1.0"
