"""Device runtime for PatchCore inspection: bundle -> pipeline -> daemon. Never imports torch."""

__version__ = "0.1.0"
