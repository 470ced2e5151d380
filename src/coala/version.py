"""The package version, in one place (``coala.__version__``, the saved files' ``versions`` record, the resume
fingerprint, ``coala --version``)."""

__version__ = "0.1.0"
