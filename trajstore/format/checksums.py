"""sha256 of stored files: recorded when written, compared when read or verified."""

from __future__ import annotations

import hashlib

from ..errors import ChecksumError, TrajstoreError


def sha256(data) -> str:
    return hashlib.sha256(data).hexdigest()


def check(data, expected: str, where) -> None:
    got = sha256(data)
    if got != expected:
        raise ChecksumError(f"sha256 mismatch: recorded {expected[:16]}..., file has {got[:16]}... "
                            "(the file was corrupted or modified after it was written)", where)


# A metadata document records its own sha256: computed with the digest's place holding this
# placeholder, so a reader replaces the recorded digest by it and hashes (docs/format.md §2).
PLACEHOLDER = "0" * 64


def seal(data: bytes, where=None) -> bytes:
    """data with its one `"<placeholder>"` replaced by the sha256 of data as it stands."""
    token = f'"{PLACEHOLDER}"'.encode()
    if data.count(token) != 1:
        raise TrajstoreError(f"cannot record the metadata's sha256: the placeholder occurs {data.count(token)} "
                             "times (a value of 64 zeros in the metadata?)", where)
    return data.replace(token, f'"{sha256(data)}"'.encode())


def check_sealed(data: bytes, recorded: str, where) -> None:
    """ChecksumError unless data, with the recorded digest put back to the placeholder, hashes to it."""
    token = f'"{recorded}"'.encode()
    if data.count(token) != 1:
        raise ChecksumError("the metadata's recorded sha256 does not occur exactly once in it (the file was "
                            "modified after it was written)", where)
    check(data.replace(token, f'"{PLACEHOLDER}"'.encode()), recorded, where)
