"""The reader moved to :mod:`rjet.reader` (one module per job); these names stay importable from here
for the modules that still do (``rjet.testing``, ``rjet/_tool_write.py``) until they import from there."""

from rjet.reader import ReadConfig, StreamClient
from rjet.reader._session import identity as _identity

__all__ = ["ReadConfig", "StreamClient", "_identity"]
