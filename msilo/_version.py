"""The single source of msilo's version string."""

__version__ = "0.1.0"
