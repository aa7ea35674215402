"""specd: a resident speculative-decoding daemon whose draft adapts to its traffic."""

__version__ = "0.1.0"
