"""The hash of a foreign ID that sharding and partitions stand on, defined once.

XXH3 64-bit (seed 0) of the foreign ID's UTF-8 bytes: every process on every host, in every version
of rjet, hashes a foreign ID to the same number (``tests/test_shard.py`` pins test vectors).
"""

from __future__ import annotations

from typing import Final

from xxhash import xxh3_64_intdigest

__all__ = ["hash_bytes", "key_hash"]

hash_bytes: Final = xxh3_64_intdigest
"""The hash of a foreign ID's UTF-8 bytes (the reader hashes raw header values with it)."""


def key_hash(foreign_id: str) -> int:
    """The hash of ``foreign_id``: ``hash_bytes(foreign_id.encode("utf-8"))``."""
    return xxh3_64_intdigest(foreign_id.encode("utf-8"))
