"""The package version, in one place (read by the package root, the saved metadata and the resume fingerprint)."""

__version__ = "0.1.0"
