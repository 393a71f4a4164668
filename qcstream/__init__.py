"""qcstream: streaming quality control for industrial parts."""

__version__ = "0.1.0"
