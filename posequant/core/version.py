"""posequant's version: in the package metadata, the CLI's --version and every model it writes."""

__version__ = "0.2.0"
