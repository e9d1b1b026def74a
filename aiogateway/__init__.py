"""aiogateway: a fast streaming API gateway on aiohttp with a per-route plugin chain."""

__all__ = ["__version__"]

__version__ = "0.1.0"
