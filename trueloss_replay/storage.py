"""Run folders in object storage (``s3://``, ``gs://``, ``file://``, any fsspec URL).

The design is a local mirror. ``run.local_path`` turns a URL into a folder of the local cache
(``$TRUELOSS_REPLAY_CACHE``, default ``~/.cache/trueloss-replay``), after downloading what
the URL holds that the mirror lacks; every other module keeps reading and writing local
files, unchanged. Each file written into a mirror through ``run.atomic_path`` is uploaded
whole right after it is renamed into place, and each file removed through
``run.remove_path`` is deleted remotely, so:

- an object appears complete or not at all: an S3 or GCS PUT (and a multipart upload, on
  completion) is atomic per object; on a file system that is not an object store
  (``file://``, ``sftp://``) the upload goes to a hidden temporary name and is renamed;
- the order of writes carries over: the callback's checkpoint is uploaded before the
  manifest that names it, and each replay result as soon as it is written, so an
  interrupted replay keeps its finished results in the bucket.

The trade-off: a replay downloads the checkpoints it evaluates anyway, and a mirror lets
h5py, Keras and the scheduler work on real files (no remote seeks). What it costs is local
disk for the mirrored run. A second command on the same URL downloads only files whose size
or ETag changed (recorded in the mirror's hidden index).
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import secrets
import threading
from pathlib import Path
from typing import Any

from trueloss_replay.errors import MissingDependencyError, RunFormatError, StorageError

#: The extra that installs each protocol's fsspec implementation.
EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}
#: Protocols whose uploads are atomic per object (a PUT, or a completed multipart upload).
ATOMIC_PUT = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss"}
#: The mirror's record of what it downloaded or uploaded: ``{relative path: stamp}``.
INDEX = ".trueloss-mirror.json"

#: The mirrors opened in this process, by local folder: where ``uploaded`` sends a file.
_mirrors: dict[str, Mirror] = {}
_mirrors_lock = threading.Lock()


def is_url(path: Any) -> bool:
    """Whether ``path`` is a URL (``scheme://...``) rather than a local path."""
    return isinstance(path, (str, os.PathLike)) and "://" in os.fspath(path)


def cache_root() -> Path:
    """The folder that holds the local mirrors: ``$TRUELOSS_REPLAY_CACHE``, else
    ``$XDG_CACHE_HOME/trueloss-replay``, else ``~/.cache/trueloss-replay``."""
    if os.environ.get("TRUELOSS_REPLAY_CACHE"):
        return Path(os.environ["TRUELOSS_REPLAY_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "trueloss-replay"


def mirror_path(url: str, what: str = "run folder") -> Path:
    """The local mirror of ``url``, brought up to date: what is new or changed remotely is
    downloaded, and a file the URL lacks is deleted locally (deleted there, or never uploaded
    by a process killed between its local write and the upload).

    Files later written into the returned folder through ``run.atomic_path`` are uploaded to
    ``url``; files removed through ``run.remove_path`` are deleted there.

    Args:
        url: an fsspec URL (``s3://bucket/runs/exp1``, ``gs://...``, ``file:///...``).
        what: what the URL is, as error messages name it.

    Returns:
        The local folder, under ``cache_root()``.

    Raises:
        MissingDependencyError: the protocol's package is not installed (the message names
            the extra: ``pip install 'trueloss-replay[s3]'``).
        StorageError: the URL cannot be read (credentials refused, no such bucket, endpoint
            unreachable); the message names the URL.
        RunFormatError: the URL is malformed (an unknown protocol, ``..`` in its path).

    Example:
        >>> mirror_path("s3://my-bucket/runs/exp1")
        PosixPath('/home/me/.cache/trueloss-replay/s3/my-bucket/runs/exp1')
    """
    # A new file system object on each call: credentials and endpoint are read now, so a
    # process that fixes its environment is not stuck with what an earlier call saw.
    mirror = Mirror(url.rstrip("/"), what)
    mirror.pull()
    with _mirrors_lock:
        _mirrors[str(mirror.local)] = mirror
    return mirror.local


def shown(path: str | os.PathLike) -> str:
    """How messages name ``path``: the URL of a mirror folder, else the path itself."""
    with _mirrors_lock:
        mirror = _mirrors.get(os.path.abspath(path)) if _mirrors else None
    return mirror.url if mirror is not None else os.fspath(path)


def uploaded(path: str | os.PathLike) -> None:
    """Uploads ``path`` when it lies in a mirror: ``run.atomic_path`` calls it after each
    rename. Does nothing for any other path."""
    found = _mirror_of(path)
    if found is not None:
        found[0].push(found[1])


def removed(path: str | os.PathLike) -> None:
    """Deletes the remote copy of ``path`` (a file or folder) when it lies in a mirror:
    ``run.remove_path`` calls it. Does nothing for any other path."""
    found = _mirror_of(path)
    if found is not None:
        found[0].delete(found[1])


def _mirror_of(path: str | os.PathLike) -> tuple[Mirror, str] | None:
    if not _mirrors:
        return None
    path = Path(os.path.realpath(path))
    with _mirrors_lock:
        mirrors = list(_mirrors.values())
    for mirror in mirrors:
        local = Path(os.path.realpath(mirror.local))
        if path.is_relative_to(local) and path != local:
            rel = path.relative_to(local).as_posix()
            if not any(part.startswith(".") for part in rel.split("/")):
                return mirror, rel
    return None


class Mirror:
    """One URL and its local mirror folder (see the module docstring)."""

    def __init__(self, url: str, what: str):
        self.url = url
        self.what = what
        self.protocol = url.split("://", 1)[0].lower()
        self.fs, root = _filesystem(url, what)
        self.root = root.rstrip("/")
        parts = [p for p in self.root.split("/") if p]
        if not parts or any(p in (".", "..") for p in parts):
            raise RunFormatError(
                f"{what} {url!r} has no usable path; give a folder such as "
                f"{self.protocol}://bucket/runs/exp1.",
                path=url,
            )
        self.local = Path(os.path.abspath(cache_root() / self.protocol / Path(*parts)))
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ the index

    def _read_index(self) -> dict[str, Any]:
        try:
            index = json.loads((self.local / INDEX).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return index if isinstance(index, dict) else {}

    def _write_index(self, index: dict[str, Any]) -> None:
        tmp = self.local / f"{INDEX}.{os.getpid()}-{secrets.token_hex(4)}.tmp"
        tmp.write_text(json.dumps(index, sort_keys=True), encoding="utf-8")
        os.replace(tmp, self.local / INDEX)

    # ------------------------------------------------------------------ transfers

    def pull(self) -> None:
        """Downloads what is new or changed remotely; deletes locally what the URL lacks."""
        try:
            self.local.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StorageError(
                f"cannot create the local mirror {self.local} of {self.url}: "
                f"{e.strerror or e}. Set TRUELOSS_REPLAY_CACHE to a writable folder.",
                path=self.local,
            ) from e
        with self._access("read"):
            try:
                listing = self.fs.find(self.root, detail=True, withdirs=False)
            except FileNotFoundError:
                if self.protocol in ATOMIC_PUT:  # an object store: the bucket is missing
                    raise
                listing = {}  # a file system: the folder is created by the first upload
        with self._lock:
            index = self._read_index()
            remote = {}
            for name, info in listing.items():
                rel = posixpath.relpath(name.strip("/"), self.root.strip("/"))
                parts = rel.split("/")
                if info.get("type") == "directory" or rel.startswith("..") or rel == ".":
                    continue
                if any(p.startswith(".") for p in parts):  # temporary names of a write
                    continue
                remote[rel] = _stamp(info)
            for rel, stamp in remote.items():
                target = self.local / rel
                if index.get(rel) == stamp and target.is_file():
                    continue
                self._download(rel, target)
                index[rel] = stamp
                self._write_index(index)  # after each file: an interrupted pull resumes
            # The URL is the truth: a file it lacks goes, whether it was deleted there or
            # never reached it (a trainer killed between its local write and the upload).
            for path in self.local.rglob("*"):
                rel = path.relative_to(self.local).as_posix()
                hidden = any(p.startswith(".") for p in rel.split("/"))
                if not hidden and rel not in remote and path.is_file():
                    with contextlib.suppress(OSError):
                        path.unlink()
            self._write_index({rel: index[rel] for rel in remote})

    def _download(self, rel: str, target: Path) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
        try:
            with self._access("read", f"{self.url}/{rel}"):
                self.fs.get_file(f"{self.root}/{rel}", str(tmp))
            os.replace(tmp, target)
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()

    def push(self, rel: str) -> None:
        """Uploads the mirror's file ``rel`` whole to the URL."""
        source = str(self.local / rel)
        remote = f"{self.root}/{rel}"
        with self._access("write", f"{self.url}/{rel}"):
            if self.protocol in ATOMIC_PUT:
                self.fs.put_file(source, remote)
            else:
                parent = posixpath.dirname(remote)
                tmp = f"{parent}/.{posixpath.basename(remote)}.{secrets.token_hex(4)}.tmp"
                self.fs.makedirs(parent, exist_ok=True)
                self.fs.put_file(source, tmp)
                self.fs.mv(tmp, remote)
            info = self.fs.info(remote)
        with self._lock:
            index = self._read_index()
            index[rel] = _stamp(info)
            self._write_index(index)

    def delete(self, rel: str) -> None:
        """Deletes the file or folder ``rel`` at the URL (nothing when it is not there)."""
        with self._access("write", f"{self.url}/{rel}"):
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm(f"{self.root}/{rel}", recursive=True)
        with self._lock:
            index = self._read_index()
            for name in [n for n in index if n == rel or n.startswith(rel + "/")]:
                del index[name]
            self._write_index(index)

    @contextlib.contextmanager
    def _access(self, doing: str, url: str | None = None):
        """Turns the storage library's errors into one-line ``StorageError``s naming the URL."""
        url = url or self.url
        try:
            yield
        except StorageError:
            raise
        except PermissionError as e:
            raise StorageError(
                f"cannot {doing} {url}: the credentials were refused ({_reason(e)}).",
                path=url,
                hint=_credentials_hint(self.protocol),
            ) from e
        except FileNotFoundError as e:
            raise StorageError(
                f"cannot {doing} {url}: {_reason(e)} (does the bucket exist?).", path=url
            ) from e
        except Exception as e:
            if type(e).__name__ in _CREDENTIAL_ERRORS:
                raise StorageError(
                    f"cannot {doing} {url}: no usable credentials ({_reason(e)}).",
                    path=url,
                    hint=_credentials_hint(self.protocol),
                ) from e
            if isinstance(e, OSError) or type(e).__module__.split(".")[0] in _STORAGE_LIBS:
                raise StorageError(f"cannot {doing} {url}: {_reason(e)}.", path=url) from e
            raise


#: botocore's and google-auth's exceptions for missing or unusable credentials.
_CREDENTIAL_ERRORS = {
    "NoCredentialsError",
    "PartialCredentialsError",
    "CredentialRetrievalError",
    "DefaultCredentialsError",
    "RefreshError",
}
_STORAGE_LIBS = {"botocore", "aiobotocore", "s3fs", "gcsfs", "google", "aiohttp", "fsspec"}


def _filesystem(url: str, what: str):
    import fsspec

    protocol = url.split("://", 1)[0].lower()
    try:
        fsspec.get_filesystem_class(protocol)
    except ImportError as e:
        extra = EXTRAS.get(protocol)
        install = f"pip install 'trueloss-replay[{extra}]'" if extra else _reason(e).rstrip(".")
        raise MissingDependencyError(
            f"{what} {url!r} is on {protocol}://, whose fsspec package is not installed: "
            f"{install}.",
            path=url,
        ) from e
    except ValueError as e:
        raise RunFormatError(
            f"{what} {url!r}: fsspec knows no protocol {protocol!r}; give a local folder or "
            "a URL such as s3://bucket/runs/exp1.",
            path=url,
            usage=True,
        ) from e
    # A fresh instance: credentials and endpoints are read now, not from an earlier call.
    return fsspec.core.url_to_fs(url, skip_instance_cache=True)


def _stamp(info: dict[str, Any]) -> list[Any]:
    version = next(
        (info[k] for k in ("ETag", "etag", "md5Hash", "mtime", "LastModified") if info.get(k)),
        None,
    )
    return [info.get("size"), None if version is None else str(version)]


def _reason(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _credentials_hint(protocol: str) -> str:
    if protocol in ("s3", "s3a"):
        return (
            "Check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), and "
            "AWS_ENDPOINT_URL_S3 for an S3-compatible server."
        )
    if protocol in ("gs", "gcs"):
        return "Check GOOGLE_APPLICATION_CREDENTIALS or run gcloud auth application-default login."
    return f"Check the credentials for {protocol}://."
