"""The package version (one place: ``coala.__version__``, the saved files' ``versions`` record, ``coala --version``)."""

__version__ = "0.1.0"
