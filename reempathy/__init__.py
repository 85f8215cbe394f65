"""reempathy: decoding strategies for end-to-end spoken language models."""

__version__ = "0.1.0"
