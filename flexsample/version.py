"""The library's version (one place: the package and its cost files read it)."""

__version__ = "0.6.0"
