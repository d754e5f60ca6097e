"""qsmprep: a BIDS App for quantitative susceptibility mapping (QSM)."""

__version__ = "0.1.0"

__all__ = ["__version__"]
