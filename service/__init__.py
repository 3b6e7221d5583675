"""rnnserve: streaming inference for recurrent models (no torch on this path)."""

__version__ = "0.1.0"
