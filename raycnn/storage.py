"""Where a run folder lives: a local path, or a URI that pyarrow.fs understands (`s3://BUCKET/PATH`,
`gs://BUCKET/PATH`, `file:///PATH`); Ray-free and torch-free.

`resolve` turns either into a `Place`, a (pyarrow FileSystem, path) pair with the few file
operations raycnn needs, and every read and write of a run folder goes through one: the plan,
the Parquet files, Tune's result.json files, the progress files, the lock's lease object.

Every write is atomic: a reader sees the old file or the new one, never part of one.
- On a local disk: `raycnn.files.atomic` (temp file, fsync, rename).
- In object storage (S3, GCS, Azure): one upload of bytes made in memory first; the store makes
  an object visible only once its upload completes, whole.
- On any other filesystem pyarrow opens (HDFS, say), where a file being written can be read
  half-made: write-new-then-point, a new file beside the target, then moved onto its name.

Credentials come only from where pyarrow's filesystems look for them: the standard AWS
environment variables, profile and instance role for S3 (`AWS_ENDPOINT_URL`, or
`?endpoint_override=HOST:PORT` in the URI, for an S3-compatible server), Google's application
default credentials for GCS. A URI that carries credentials itself is refused: the filesystem
made from it would carry them into Tune's pickled state in the run folder and into every Ray
worker. So raycnn writes none anywhere, and a Place pickles without any: each Ray worker that
gets one finds its own node's.
"""
from __future__ import annotations

import fnmatch
import io
import posixpath
import secrets
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable

import pyarrow.fs as pafs

from raycnn.errors import StorageError, UserError
from raycnn.files import atomic

# The URI scheme of each pyarrow filesystem type (type_name -> scheme), for messages.
SCHEMES = {"s3": "s3", "gcs": "gs", "abfs": "abfs", "hdfs": "hdfs", "local": "file"}
# Filesystems whose objects appear only whole, once their upload completes (pyarrow type_name).
OBJECT_STORES = {"s3", "gcs", "abfs"}
# Query parameters that would put a secret into the URI (Azure takes client_secret there).
SECRET_WORDS = ("secret", "token", "key", "password", "credential")


def first_line(e: BaseException) -> str:
    """An exception as one short line (pyarrow's errors from S3 run over several)."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


@dataclass(frozen=True, eq=False)
class Place:
    """A file or folder on a filesystem: `fs` (pyarrow) and `path` (on it: absolute on a local
    disk, BUCKET/KEY on object storage). Folders on object storage are key prefixes: they
    exist once something is in them."""
    fs: pafs.FileSystem
    path: str

    def __truediv__(self, name: str) -> Place:
        return Place(self.fs, posixpath.join(self.path, name))

    def __str__(self) -> str:
        return self.path if self.local else f"{SCHEMES.get(self.fs.type_name, self.fs.type_name)}://{self.path}"

    @property
    def name(self) -> str:
        return posixpath.basename(self.path)

    @property
    def parent(self) -> Place:
        return Place(self.fs, posixpath.dirname(self.path))

    @property
    def local(self) -> Path | None:
        """The local path, or None on object storage (for what only a local disk can do:
        flock, redirecting file descriptors, file permissions)."""
        return Path(self.path) if isinstance(self.fs, pafs.LocalFileSystem) else None

    def _info(self) -> pafs.FileInfo:
        try:
            return self.fs.get_file_info(self.path)
        except OSError as e:
            raise StorageError(f"cannot reach {self}: {first_line(e)}") from None

    def exists(self) -> bool:
        return self._info().type != pafs.FileType.NotFound

    def is_file(self) -> bool:
        return self._info().type == pafs.FileType.File

    def read_bytes(self) -> bytes:
        """The file's bytes; FileNotFoundError if there is none, OSError if it cannot be read."""
        with self.fs.open_input_stream(self.path) as f:
            return f.read()

    def read_text(self) -> str:
        return self.read_bytes().decode("utf-8")

    def write(self, fill: Callable[[BinaryIO], None], durable: bool = True) -> Place:
        """Write the file through `fill(binary file)`, atomically (see the module's doc);
        `durable=False` skips a local disk's fsyncs (for files whose loss costs nothing).
        StorageError (one line) on failure; a `fill` that fails leaves the old file as it was."""
        if self.local:
            atomic(self.local, lambda tmp: _fill_file(tmp, fill), durable)
            return self
        # The whole file is made in memory first: a `fill` that fails half-way must not end in
        # an upload (closing an output stream completes its upload, whatever it holds).
        buffer = io.BytesIO()
        fill(buffer)
        try:
            if self.fs.type_name in OBJECT_STORES:
                _upload(self, buffer.getvalue())
                return self
            new = self.parent / f".{self.name}.{secrets.token_hex(4)}.tmp"
            try:
                self.fs.create_dir(self.parent.path, recursive=True)
                _upload(new, buffer.getvalue())
                self.fs.move(new.path, self.path)
            except OSError:
                _discard(new)
                raise
        except OSError as e:
            raise StorageError(f"cannot write {self}: {first_line(e)}") from None
        return self

    def write_bytes(self, data: bytes, durable: bool = True) -> Place:
        return self.write(lambda f: f.write(data), durable)

    def write_text(self, text: str, durable: bool = True) -> Place:
        return self.write_bytes(text.encode("utf-8"), durable)

    def tree(self) -> dict[str, pafs.FileInfo]:
        """Every file under this folder, by its path relative to it ({} if there is none):
        one listing, so that reading a run's Tune folder costs one request, not one per file."""
        try:
            found = self.fs.get_file_info(pafs.FileSelector(self.path, recursive=True, allow_not_found=True))
        except OSError as e:
            raise StorageError(f"cannot list {self}: {first_line(e)}") from None
        root = self.path.rstrip("/") + "/"
        return {i.path[len(root):]: i for i in found if i.type == pafs.FileType.File and i.path.startswith(root)}

    def files(self, pattern: str) -> list[Place]:
        """The files directly in this folder whose names match the glob `pattern`."""
        return [self / rel for rel in sorted(self.tree()) if "/" not in rel and fnmatch.fnmatch(rel, pattern)]

    def mkdir(self) -> None:
        try:
            self.fs.create_dir(self.path, recursive=True)
        except OSError as e:
            raise StorageError(f"cannot create {self}: {first_line(e)}") from None

    def unlink(self) -> None:
        """Remove the file if it is there."""
        try:
            self.fs.delete_file(self.path)
        except FileNotFoundError:
            pass

    def rmtree(self) -> None:
        """Remove the folder and everything in it, if it is there."""
        try:
            self.fs.delete_dir(self.path)
        except FileNotFoundError:
            pass


def _fill_file(tmp: str, fill: Callable[[BinaryIO], None]) -> None:
    with open(tmp, "wb") as f:
        fill(f)


def _upload(target: Place, data: bytes) -> None:
    """The file as one output stream; OSError if it fails."""
    with target.fs.open_output_stream(target.path) as out:
        out.write(data)


def _discard(place: Place) -> None:
    """Remove what a failed write left, if it can: litter, never a reason to fail."""
    try:
        place.unlink()
    except OSError:
        pass


def resolve(where: str | Path | Place) -> Place:
    """A results location as a Place: a local path (made absolute, `~` expanded) or a URI
    pyarrow.fs understands; StorageError in one line for a URI it does not, or for one that
    carries credentials (they must come from the environment: see the module's doc)."""
    if isinstance(where, Place):
        return where
    text = str(where)
    if "://" not in text:
        return Place(pafs.LocalFileSystem(), str(Path(text).expanduser().resolve()))
    if _holds_credentials(text):
        raise StorageError(f"{_without_userinfo(text)}: credentials in the URI are refused (they would be saved with "
                           f"the run's state); give them the standard way: AWS_ACCESS_KEY_ID and "
                           f"AWS_SECRET_ACCESS_KEY, AWS_PROFILE or an instance role for S3, application default "
                           f"credentials for GCS")
    try:
        fs, path = pafs.FileSystem.from_uri(text)
    except (ValueError, OSError) as e:    # pyarrow's ArrowInvalid is a ValueError
        raise StorageError(f"{text}: not a location pyarrow.fs can open ({first_line(e)})") from None
    return Place(fs, path.rstrip("/") or path)


def _holds_credentials(uri: str) -> bool:
    """A password in the URI's user part, an S3 access key there (pyarrow reads `s3://KEY:SECRET@`),
    or a query parameter named like a secret."""
    parts = urllib.parse.urlsplit(uri)
    names = [name.lower() for name, _ in urllib.parse.parse_qsl(parts.query)]
    return (parts.password is not None or (parts.scheme == "s3" and bool(parts.username))
            or any(word in name for name in names for word in SECRET_WORDS))


def _without_userinfo(uri: str) -> str:
    """The URI as it may be shown: no user part, no query (either may hold the secret)."""
    parts = urllib.parse.urlsplit(uri)
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))


def probe(run_dir: Place, token: str, who: str) -> str:
    """Whether this process sees the run folder the driver made and can write in it: reads the
    driver's probe file `.probe-TOKEN` and writes and removes one of its own. Returns what is
    wrong, in a few words ("" when nothing is). Run on every node before any trial starts."""
    try:
        seen = (run_dir / f".probe-{token}").read_bytes()
    except FileNotFoundError:
        return "cannot see it"
    except OSError as e:
        return f"cannot read it ({first_line(e)})"
    if seen != token.encode():
        return "sees another folder at that path"
    mine = run_dir / f".probe-{token}-{who}"
    try:
        mine.write_bytes(b"ok", durable=False)
        mine.unlink()
    except (OSError, UserError) as e:
        return f"cannot write there ({first_line(e)})"
    return ""
