"""bytelm: multi-token prediction for byte-level and token-level language models of code."""

__version__ = "0.1.0"
