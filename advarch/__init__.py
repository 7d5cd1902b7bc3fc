"""advarch: config-driven training of advanced neural architectures."""

__version__ = "0.1.0"
