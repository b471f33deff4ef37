"""What a path or URL names, decided once for every command and `trajstore.open`.

`locate(target)` tells a local path from an fsspec URL ("file://" URLs are local paths, as in
zarr-python), and `Location.kind` what is there: a .ctraj (directory or single-file form), a packed
archive, a legacy buffer, or nothing yet. `open_store` turns it into a Store for reading or writing.
Filesystem options (endpoint, credentials, profile) pass to fsspec unchanged, as `storage_options`
does in zarr and pandas; fsspec's and the backends' environment variables apply as usual
(e.g. AWS_PROFILE, AWS_ENDPOINT_URL, FSSPEC_S3_ENDPOINT_URL).
"""

from __future__ import annotations

import json
import os
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import FormatError, TrajstoreError
from .base import ROOT_KEY, Store
from .files import ZIP_MAGIC, DirectoryStore, ZipFileStore

# "s3://...", "gs://...", "hf://...", "memory://...", "https://..."; not "C:\..." (two letters at least)
_URL = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.\-]+)://")

KINDS = ("ctraj", "archive", "legacy", "missing")
ARCHIVE_ATTRIBUTE = "trajstore_archive"
CTRAJ_ATTRIBUTE = "trajstore"


def is_url(target) -> bool:
    return isinstance(target, str) and _URL.match(target) is not None


def parse_storage_options(pairs) -> dict:
    """CLI `--storage-option KEY=VALUE` pairs -> fsspec keyword arguments. Values are JSON where they
    parse as JSON (true, 3, {"a": 1}), else strings; dotted keys nest (client_kwargs.region_name=...)."""
    options: dict = {}
    for pair in pairs or ():
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise TrajstoreError(f"storage option {pair!r} is not KEY=VALUE")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        *parents, last = key.split(".")
        node = options
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise TrajstoreError(f"storage option {pair!r} conflicts with {part}={node!r}")
        node[last] = value
    return options


@dataclass
class Location:
    """One user-given target: a local path, or a URL with its fsspec filesystem."""

    target: str
    path: Path | None = None  # local
    fs: object = None  # remote: the fsspec filesystem
    fs_path: str = ""  # remote: the path inside fs
    storage_options: dict = field(default_factory=dict)

    @property
    def remote(self) -> bool:
        return self.fs is not None

    @property
    def url(self) -> str:
        return str(self.path) if self.path is not None else self.target.rstrip("/")

    @property
    def name(self) -> str:
        """The last component, for default output names."""
        return (self.path.name if self.path is not None else self.fs_path.rstrip("/").rsplit("/", 1)[-1])

    def __fspath__(self) -> str:
        if self.path is None:
            raise TrajstoreError("this is a URL; this operation needs a local path", self.url)
        return str(self.path)

    def exists(self) -> bool:
        if self.path is not None:
            return self.path.exists() or self.path.is_symlink()
        try:
            self.fs.invalidate_cache(self.fs_path)  # others write here too: ask the backend
            return self.fs.exists(self.fs_path)
        except Exception as exc:  # network and permission failures come in many types
            raise FormatError(f"cannot reach ({type(exc).__name__}: {exc})", self.url) from None

    def is_dir(self) -> bool:
        if self.path is not None:
            return self.path.is_dir()
        try:
            return self.fs.isdir(self.fs_path)
        except Exception as exc:
            raise FormatError(f"cannot reach ({type(exc).__name__}: {exc})", self.url) from None

    def _root_attributes(self) -> dict:
        try:
            if self.path is not None:
                data = (self.path / ROOT_KEY).read_bytes()
            else:
                data = self.fs.cat_file(f"{self.fs_path.rstrip('/')}/{ROOT_KEY}")
            doc = json.loads(data)
        except (OSError, ValueError):
            return {}
        except Exception:  # a remote backend's own "not found" or permission errors
            return {}
        attrs = doc.get("attributes") if isinstance(doc, dict) else None
        return attrs if isinstance(attrs, dict) else {}

    def archive_attributes(self) -> dict | None:
        """The root's archive attribute (a packed archive), or None."""
        value = self._root_attributes().get(ARCHIVE_ATTRIBUTE)
        return value if isinstance(value, dict) else None

    def _head(self, n: int) -> bytes:
        if self.path is not None:
            with open(self.path, "rb") as f:
                return f.read(n)
        return self.fs.cat_file(self.fs_path, start=0, end=n)

    def _has_root(self) -> bool:
        """A remote directory-form store or archive: its root zarr.json is there (one HEAD, no
        listing: https:// has none, and an object store's "directory" is only a key prefix)."""
        root = f"{self.fs_path.rstrip('/')}/{ROOT_KEY}"
        try:
            self.fs.invalidate_cache(root)  # others write here too: ask the backend
            return self.fs.isfile(root)
        except Exception as exc:
            raise FormatError(f"cannot reach ({type(exc).__name__}: {exc})", self.url) from None

    @property
    def kind(self) -> str:
        """"ctraj", "archive", "legacy" (anything else a reader of legacy buffers judges) or "missing"."""
        if self.path is None:  # by keys only: a listing of https:// is a web page, of S3 a key prefix
            if self._has_root():
                return "archive" if ARCHIVE_ATTRIBUTE in self._root_attributes() else "ctraj"
            if not self.exists():
                return "missing"
            return "ctraj" if self.form == "file" else "legacy"
        if not self.exists():
            return "missing"
        if self.is_dir():
            if ARCHIVE_ATTRIBUTE in self._root_attributes():
                return "archive"
            return "ctraj" if (self.path / ROOT_KEY).is_file() else "legacy"
        return "ctraj" if self.form == "file" else "legacy"

    @property
    def form(self) -> str | None:
        """"directory", "file" (a zip holding a root zarr.json: the single-file .ctraj) or None."""
        if self.path is None and self._has_root():
            return "directory"
        if self.path is not None and self.is_dir():
            return "directory"
        try:
            if self._head(4) != ZIP_MAGIC:
                return None
            if self.path is not None:
                with zipfile.ZipFile(self.path) as zf:  # torch files are zips too
                    return "file" if ROOT_KEY in zf.namelist() else None
            return "file" if ZipFileStore(self.fs_path, fs=self.fs).exists(ROOT_KEY) else None
        except Exception:  # a corrupt zip directory fails with many types (BadZipFile, ValueError, ...)
            return None

    def local(self, what: str) -> Path:
        """The local path, or one error saying `what` needs one."""
        if self.path is None:
            raise TrajstoreError(f"{what} works on local paths only (local files only); copy it to a local "
                                 "path first", self.url)
        return self.path


def where(target) -> str:
    """How provenance records name a source: a local path made absolute, a URL as given."""
    if is_url(target) and not target.startswith("file://"):
        return target
    path = target[len("file://"):] if isinstance(target, str) and target.startswith("file://") else target
    return str(Path(path).resolve())


# What to pip install for a URL scheme (fsspec's own message names a class, not a package), and
# which of those the `remote` extra brings.
PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "hf": "huggingface_hub",
            "http": "aiohttp", "https": "aiohttp", "az": "adlfs", "abfs": "adlfs"}
REMOTE_EXTRA = ("fsspec", "s3fs", "aiohttp", "huggingface_hub")


def _missing_package(protocol: str) -> str:
    package = PACKAGES.get(protocol)
    if package is None:
        return f"{protocol}:// URLs need an fsspec filesystem package that is not installed"
    extra = " (or pip install 'trajstore[remote]')" if package in REMOTE_EXTRA else ""
    return f"{protocol}:// URLs need {package}, which is not installed: pip install {package}{extra}"


def locate(target, storage_options: dict | None = None) -> Location:
    """A Location for a path, a "file://" URL or any fsspec URL (options go to its filesystem)."""
    if isinstance(target, Location):
        return target
    options = dict(storage_options or {})
    if isinstance(target, os.PathLike) or not is_url(target):
        if not isinstance(target, (str, os.PathLike)):
            raise TrajstoreError(f"expected a path or URL, got {type(target).__name__}")
        return Location(target=os.fspath(target), path=Path(target), storage_options=options)
    if target.startswith("file://"):
        return Location(target=target, path=Path(target[len("file://"):]), storage_options=options)
    try:
        import fsspec
    except ImportError:
        raise TrajstoreError("URLs need fsspec, which is not installed: pip install 'trajstore[remote]'",
                             target) from None
    try:
        fs, fs_path = fsspec.url_to_fs(target, **options)
    except ImportError:
        raise TrajstoreError(_missing_package(target.split("://", 1)[0].lower()), target) from None
    except (ValueError, TypeError) as exc:
        raise TrajstoreError(f"cannot open this URL ({type(exc).__name__}: {exc})", target) from None
    return Location(target=target, fs=fs, fs_path=fs_path.rstrip("/"), storage_options=options)


def open_store(target, storage_options: dict | None = None, *, mode: str = "r") -> Store:
    """The Store at `target`: for mode "r" an existing .ctraj (directory or single file), for mode "w"
    the directory-form location to write (which may not exist yet)."""
    loc = locate(target, storage_options)
    if mode == "w":
        if loc.path is not None:
            return DirectoryStore(loc.path)
        from .remote import FsspecStore

        return FsspecStore(loc.fs, loc.fs_path, loc.url)
    if mode != "r":
        raise TrajstoreError(f"mode must be 'r' or 'w', not {mode!r}")
    if loc.path is not None and loc.is_dir():
        return DirectoryStore(loc.path)
    if loc.path is None and loc._has_root():  # the root key, not a listing: https:// has none
        from .remote import FsspecStore

        return FsspecStore(loc.fs, loc.fs_path, loc.url)
    if not loc.exists():
        raise FormatError("no such .ctraj (neither a directory nor a file)", loc.url)
    try:
        magic = loc._head(4)
    except Exception as exc:
        raise FormatError(f"cannot read ({type(exc).__name__}: {exc})", loc.url) from None
    if magic != ZIP_MAGIC:
        raise FormatError("not a .ctraj: neither a directory nor a single-file (zip) .ctraj", loc.url)
    return ZipFileStore(loc.path) if loc.path is not None else ZipFileStore(loc.fs_path, fs=loc.fs)
