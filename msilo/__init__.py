"""msilo: a standalone SIP offline-message server."""

from msilo._version import __version__

__all__ = ["__version__"]
