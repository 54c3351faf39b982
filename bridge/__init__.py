"""Enterprise policy bridge for Synapse."""

__version__ = "0.1.0"
