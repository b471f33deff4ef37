"""sha256 of stored files: recorded when written, compared when read or verified."""

from __future__ import annotations

import hashlib

from ..errors import ChecksumError


def sha256(data) -> str:
    return hashlib.sha256(data).hexdigest()


def check(data, expected: str, where) -> None:
    got = sha256(data)
    if got != expected:
        raise ChecksumError(f"sha256 mismatch: recorded {expected[:16]}..., file has {got[:16]}... "
                            "(the file was corrupted or modified after it was written)", where)
