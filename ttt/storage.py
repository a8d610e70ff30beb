"""Where checkpoints are kept: a local folder (the default) or any fsspec URL (``s3://bucket/prefix`` via s3fs).

``store.py`` decides what a checkpoint holds; this module only keeps bytes under names. A ``Folder`` is one
directory of a store; its operations:

    read(name) -> bytes                          FileNotFoundError when absent
    write_all(name, files)                       a new sub-folder of (relative name, bytes), complete or absent
    read_versioned(name) -> (bytes | None, version)
    swap(name, data, version) -> bool            compare-and-swap of a small object (``LATEST``, ``LEASE``)
    subfolders(), remove(name), size(), child(name), exists(name), clean()

What each backend guarantees:

============  =======================================================  ============================================
backend       a checkpoint (``write_all``)                             ``swap``
============  =======================================================  ============================================
local folder  files fsynced in a temporary folder, renamed into place  read, compare, write-and-rename under an
                                                                       exclusive ``flock`` of the folder itself:
                                                                       atomic between the processes of one host
``s3://``     objects under a name no other save uses, never           a conditional PUT (``If-None-Match: *`` to
              overwritten; visible once ``LATEST`` names them          create, ``If-Match: <ETag>`` to replace):
                                                                       atomic between machines (S3, and stores
                                                                       that honour both headers)
other fsspec  as ``s3://``                                             read, compare, write under a lock of this
                                                                       process: safe for one writing process only
============  =======================================================  ============================================
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import secrets
import shutil
import tempfile
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterable
from pathlib import Path


class StoreUnavailable(OSError):
    """The session store did not answer (after the client library's own retries): nothing was changed by this
    call that a later one cannot redo; try again."""


TEMP_PREFIX = ".tmp-"  # a local write_all in progress (or killed): never listed, removed by ``clean``


class Folder(ABC):
    """One directory of a store (see the module's table)."""

    @property
    @abstractmethod
    def location(self) -> Path | str:
        """What a caller of the Python API names it by: a Path for a local folder, the URL of an object store's."""

    @abstractmethod
    def child(self, name: str) -> Folder: ...

    @property
    @abstractmethod
    def name(self) -> str: ...

    @abstractmethod
    def read(self, name: str) -> bytes: ...

    @abstractmethod
    def exists(self, name: str = "") -> bool: ...

    @abstractmethod
    def write_all(self, name: str, files: Iterable[tuple[str, bytes]]) -> None: ...

    @abstractmethod
    def read_versioned(self, name: str) -> tuple[bytes | None, object]: ...

    @abstractmethod
    def swap(self, name: str, data: bytes, version: object) -> bool: ...

    @abstractmethod
    def subfolders(self) -> list[str]: ...

    @abstractmethod
    def remove(self, name: str = "") -> None: ...

    @abstractmethod
    def size(self) -> int: ...

    @abstractmethod
    def clean(self) -> None:
        """Remove what a killed ``write_all`` left."""

    def unique(self, name: str) -> str:
        """A name for a new sub-folder that no other writer picks: a local rename onto an existing folder fails,
        so ``name`` is enough there; object stores overwrite, so they add a random suffix."""
        return name


def as_folder(where: str | os.PathLike | Folder, **storage_options) -> Folder:
    """A local path or an fsspec URL (``scheme://...``) as a Folder; ``storage_options`` go to fsspec."""
    if isinstance(where, Folder):
        return where
    if isinstance(where, str) and "://" in where and not where.startswith("file://"):
        import fsspec

        fs, path = fsspec.core.url_to_fs(where, **storage_options)
        return ObjectFolder(fs, path.rstrip("/"))
    return LocalFolder(Path(str(where).removeprefix("file://")))


# ---- local folders -------------------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    _write_file(tmp, data)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


class LocalFolder(Folder):
    def __init__(self, path: Path):
        self.path = Path(path)

    def __str__(self) -> str:
        return str(self.path)

    def __eq__(self, other) -> bool:
        return isinstance(other, LocalFolder) and other.path == self.path

    def __hash__(self) -> int:
        return hash(self.path)

    @property
    def location(self) -> Path:
        return self.path

    def child(self, name: str) -> LocalFolder:
        return LocalFolder(self.path / name)

    @property
    def name(self) -> str:
        return self.path.name

    def read(self, name: str) -> bytes:
        return (self.path / name).read_bytes()

    def exists(self, name: str = "") -> bool:
        return (self.path / name).is_file() if name else self.path.is_dir()

    def write_all(self, name: str, files: Iterable[tuple[str, bytes]]) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{name.split('-')[0]}-", dir=self.path))
        try:
            folders = {tmp}
            for relative, data in files:
                file = tmp / relative
                if file.parent not in folders:
                    file.parent.mkdir(parents=True, exist_ok=True)
                    folders.add(file.parent)
                _write_file(file, data)
            for folder in sorted(folders, reverse=True):  # the deepest first: each entry is durable in its parent
                _fsync_dir(folder)
            os.rename(tmp, self.path / name)
            _fsync_dir(self.path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def read_versioned(self, name: str) -> tuple[bytes | None, object]:
        try:
            data = self.read(name)
        except FileNotFoundError:
            data = None
        return data, data  # the content is the version

    def swap(self, name: str, data: bytes, version: object) -> bool:
        self.path.mkdir(parents=True, exist_ok=True)
        folder = os.open(self.path, os.O_RDONLY)
        try:
            fcntl.flock(folder, fcntl.LOCK_EX)  # the folder itself is the lock; released when it closes
            if self.read_versioned(name)[1] != version:
                return False
            _write_atomic(self.path / name, data)
            return True
        finally:
            os.close(folder)

    def subfolders(self) -> list[str]:
        if not self.path.is_dir():
            return []
        return [p.name for p in self.path.iterdir() if p.is_dir() and not p.name.startswith(TEMP_PREFIX)]

    def remove(self, name: str = "") -> None:
        path = self.path / name
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)

    def size(self) -> int:
        if not self.path.is_dir():
            return 0
        return sum(
            f.stat().st_size
            for f in self.path.rglob("*")
            if f.is_file() and not any(part.startswith(TEMP_PREFIX) for part in f.relative_to(self.path).parts)
        )

    def clean(self) -> None:
        if self.path.is_dir():
            for stale in self.path.glob(f"{TEMP_PREFIX}*"):
                if stale.is_dir():
                    shutil.rmtree(stale, ignore_errors=True)


# ---- object stores (fsspec) ----------------------------------------------------------------------

_process_swap = threading.Lock()  # the compare-and-swap of stores without conditional writes


@functools.cache
def _unreachable() -> tuple[type[BaseException], ...]:
    """The exceptions that mean the store did not answer (botocore's, when installed, are not OSErrors)."""
    try:
        from botocore.exceptions import ConnectionError as BotoConnectionError
        from botocore.exceptions import HTTPClientError
    except ImportError:
        return (ConnectionError, TimeoutError)
    return (ConnectionError, TimeoutError, BotoConnectionError, HTTPClientError)


def _answered(method):
    """``method`` with the store's silence raised as StoreUnavailable (one type for both doors to map)."""

    @functools.wraps(method)
    def call(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except _unreachable() as e:
            raise StoreUnavailable(f"session store unreachable ({type(e).__name__}): try again") from e

    return call


class ObjectFolder(Folder):
    """A directory of an fsspec filesystem; on S3 ``swap`` is a conditional PUT."""

    def __init__(self, fs, path: str):
        self.fs, self.path = fs, path
        self.s3 = "s3" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))

    def __str__(self) -> str:
        return self.fs.unstrip_protocol(self.path)

    def __eq__(self, other) -> bool:
        return isinstance(other, ObjectFolder) and other.fs is self.fs and other.path == self.path

    def __hash__(self) -> int:
        return hash(self.path)

    def _key(self, name: str) -> str:
        return f"{self.path}/{name}" if name else self.path

    @property
    def location(self) -> str:
        return str(self)

    def unique(self, name: str) -> str:
        return f"{name}-{secrets.token_hex(4)}"

    def clean(self) -> None:
        """Nothing: the objects of a killed save are never named by ``LATEST``; a later save prunes them."""

    def child(self, name: str) -> ObjectFolder:
        return ObjectFolder(self.fs, self._key(name))

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    def read(self, name: str) -> bytes:
        try:
            return self.fs.cat_file(self._key(name))
        except (FileNotFoundError, IsADirectoryError):
            raise FileNotFoundError(f"{self}/{name}") from None

    def exists(self, name: str = "") -> bool:
        self.fs.invalidate_cache(self.path)  # another replica may have written since this process listed
        return self.fs.isfile(self._key(name)) if name else self.fs.isdir(self.path)

    def write_all(self, name: str, files: Iterable[tuple[str, bytes]]) -> None:
        for relative, data in files:
            self.fs.pipe_file(self._key(f"{name}/{relative}"), data)

    def read_versioned(self, name: str) -> tuple[bytes | None, object]:
        if not self.s3:
            try:
                data = self.read(name)
            except FileNotFoundError:
                data = None
            return data, data
        from fsspec.asyn import sync

        bucket, key, _ = self.fs.split_path(self._key(name))
        try:
            return sync(self.fs.loop, _get_object, self.fs, bucket, key)
        except FileNotFoundError:
            return None, None

    def swap(self, name: str, data: bytes, version: object) -> bool:
        if not self.s3:
            with _process_swap:
                if self.read_versioned(name)[1] != version:
                    return False
                self.fs.pipe_file(self._key(name), data)
                return True
        bucket, key, _ = self.fs.split_path(self._key(name))
        condition = {"IfNoneMatch": "*"} if version is None else {"IfMatch": version}
        try:
            self.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, **condition)
        except OSError as e:  # s3fs turns 412 PreconditionFailed / 409 ConditionalRequestConflict into OSError
            if _refused_condition(e):
                return False
            raise
        finally:
            self.fs.invalidate_cache(self.path)
        return True

    def subfolders(self) -> list[str]:
        self.fs.invalidate_cache(self.path)
        try:
            entries = self.fs.ls(self.path, detail=True)
        except FileNotFoundError:
            return []
        return [e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e["type"] == "directory"]

    def remove(self, name: str = "") -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(self._key(name), recursive=True)
        self.fs.invalidate_cache(self.path)

    def size(self) -> int:
        self.fs.invalidate_cache(self.path)
        try:
            return int(self.fs.du(self.path, total=True))
        except FileNotFoundError:
            return 0


async def _get_object(fs, bucket: str, key: str) -> tuple[bytes, str]:
    """An object's content and ETag from one response: the version is the content's."""
    reply = await fs._call_s3("get_object", Bucket=bucket, Key=key)
    return await reply["Body"].read(), reply["ETag"]


for _name in ("read", "exists", "write_all", "read_versioned", "swap", "subfolders", "remove", "size"):
    setattr(ObjectFolder, _name, _answered(getattr(ObjectFolder, _name)))


def _refused_condition(e: OSError) -> bool:
    cause = e.__cause__ or e.__context__
    code = getattr(cause, "response", {}).get("Error", {}).get("Code", "")
    return code in {"PreconditionFailed", "ConditionalRequestConflict"} or "pre-condition" in str(e)
