"""Where a store lives: local paths and fsspec URLs behind one small interface.

A `Location` is plain data (URL and storage options) and pickles as such; the
filesystem objects it opens are per process (fsspec's async filesystems are not
fork-safe), created on first use.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field
from typing import Any, Sequence

import fsspec
from fsspec.implementations.local import LocalFileSystem

LAYOUT = {
    "parts": "parts",
    "manifest_parts": "manifest/parts",
    "manifest_failures": "manifest/failures",
}
"""Directories under the store root (see `label_store.writer` for the whole layout)."""

QUANT_ARRAY = "quant"
"""Array of a part holding the quantization parameters (scale, offset) of every view."""
WRITER_LEASE = "_writer.json"
"""File in a part directory naming the process that writes it."""


@dataclass
class Location:
    """A store root: a local path or an fsspec URL (``s3://bucket/prefix``), plus options."""

    url: str
    """As given by the caller (a path, ``file://`` or any fsspec protocol)."""
    storage_options: dict = field(default_factory=dict)
    """Passed to fsspec (e.g. ``key``, ``secret``, ``client_kwargs``)."""
    _pid: int = field(default=-1, repr=False, compare=False)
    _fs: Any = field(default=None, repr=False, compare=False)
    _root: str = field(default="", repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.url, (str, os.PathLike)) or not str(self.url):
            raise ValueError(f"Location(url=) expects a path or URL string. Got {self.url!r}.")
        self.url = os.fspath(self.url)
        self.storage_options = dict(self.storage_options or {})

    def __getstate__(self) -> dict:
        return {"url": self.url, "storage_options": self.storage_options}

    def __setstate__(self, state: dict) -> None:
        self.url = state["url"]
        self.storage_options = state["storage_options"]
        self._pid, self._fs, self._root = -1, None, ""

    def _open(self) -> None:
        if self._pid == os.getpid() and self._fs is not None:
            return
        fs, root = fsspec.core.url_to_fs(self.url, **self.storage_options)
        if isinstance(fs, LocalFileSystem):
            root = os.path.abspath(root)
        self._fs, self._root, self._pid = fs, root.rstrip("/"), os.getpid()

    @property
    def fs(self):
        """The synchronous fsspec filesystem of this process."""
        self._open()
        return self._fs

    @property
    def root(self) -> str:
        """The store root as a path inside `fs` (no protocol, no trailing slash)."""
        self._open()
        return self._root

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, LocalFileSystem)

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *[p.strip("/") for p in parts if p]])

    def zarr_store(self):
        """A zarr v3 store on the same root: `LocalStore` for local paths, else `FsspecStore`."""
        from zarr.storage import FsspecStore, LocalStore

        if self.is_local:
            return LocalStore(self.root)
        return FsspecStore.from_url(self.url, storage_options=self.storage_options or None)

    # ---- small file operations ------------------------------------------------------

    def refresh(self, path: str | None = None) -> None:
        """Drop cached directory listings (s3fs caches them) so new files become visible."""
        invalidate = getattr(self.fs, "invalidate_cache", None)
        if invalidate is not None:
            invalidate(path)

    def read_bytes(self, path: str) -> bytes:
        return self.fs.cat_file(path)

    def read_many(self, paths: Sequence[str]) -> list[bytes]:
        """Whole files, fetched concurrently on async filesystems."""
        if not paths:
            return []
        if self.is_local:
            return [self.fs.cat_file(p) for p in paths]
        found = self.fs.cat(list(paths), on_error="raise")
        return [found[p] if p in found else found[self.fs._strip_protocol(p)] for p in paths]

    def list_names(self, directory: str, suffix: str = "") -> list[str]:
        """Names (not paths) directly in ``directory`` ending with ``suffix``; [] if it is absent."""
        self.refresh(directory)
        try:
            entries = self.fs.ls(directory, detail=False)
        except FileNotFoundError:
            return []
        names = [e.rstrip("/").rsplit("/", 1)[-1] for e in entries]
        return sorted(n for n in names if n.endswith(suffix) and not n.startswith(".tmp-"))

    def publish(self, path: str, data: bytes, *, exclusive: bool) -> None:
        """Make ``data`` appear at ``path`` all at once (readers see the old state or the new one).

        Local: write a temporary file beside it, fsync, then link it into place (``exclusive``:
        fail if ``path`` exists) or rename over it. Object stores: one PUT, which is atomic;
        ``exclusive`` checks for an existing object first and asks for ``If-None-Match``.

        Raises:
            FileExistsError: ``exclusive`` and ``path`` already exists.
        """
        directory, name = path.rsplit("/", 1)
        if self.is_local:
            os.makedirs(directory, exist_ok=True)
            temporary = f"{directory}/.tmp-{uuid.uuid4().hex}-{name}"
            with open(temporary, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            try:
                if exclusive:
                    os.link(temporary, path)  # atomic, and refuses to replace
                else:
                    os.replace(temporary, path)
            finally:
                if os.path.exists(temporary):
                    os.unlink(temporary)
            return
        self.refresh(directory)
        if exclusive and self.fs.exists(path):
            raise FileExistsError(path)
        if exclusive:
            try:
                self.fs.pipe_file(path, data, mode="create")
                return
            except (TypeError, NotImplementedError):
                pass  # an fsspec backend without create mode: the exists() check above stands
        self.fs.pipe_file(path, data)

    def write_file(self, path: str, data: bytes) -> None:
        """A file written in one operation, not atomically: a writer lease, or the arrays of a
        part, which readers reach only through the part's manifest entry, published last."""
        if self.is_local:
            os.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
            with open(path, "wb") as handle:
                handle.write(data)
            return
        self.fs.pipe_file(path, data)

    def remove_tree(self, path: str) -> None:
        self.refresh(path)
        try:
            self.fs.rm(path, recursive=True)
        except FileNotFoundError:
            pass
