"""Target sources: where the teacher's outputs for a batch of views come from.

Legend: B views in a batch; every target is Tensor[B, C, H, W] float32 (logits or
features, decoded), named as in the label store (``cls/p3``, ``box/p3``, ``fpn/p3``,
``backbone/c3``).

One interface, `TargetSource`, four implementations:

- `StoreSource` (offline, the default): reads a label store. Its reads happen inside the
  DataLoader workers (`TargetSource.worker_reader`), so the training process only stacks.
- `RemoteSource` (online): asks the teacher endpoint, ``POST {url}/v1/targets``, over
  HTTP with the original image bytes and the view recipes; retries a 503 (honouring
  ``Retry-After``) and connection errors with bounded exponential backoff.
- `ReadThroughSource`: the store, with views it does not hold filled by the endpoint.
- `InProcessTeacherSource`: the teacher loaded in this process and run under no_grad on
  exactly the rendered views the student sees. A comparison baseline only, never the
  default: the product's promise is training without the teacher in the process.

This module never imports `teacher_service`; a remote teacher is reached over HTTP only.
"""

from __future__ import annotations

import json
import logging
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from detcore.outputs import TARGET_GROUPS, DenseOutputs, fingerprint_point_offset, map_outputs
from detcore.views import View
from student_trainer.data import StoreTargetReader

logger = logging.getLogger(__name__)


class TargetSourceError(RuntimeError):
    """A target source could not deliver the targets of a batch (names the views and the cause)."""


class RemoteSourceError(TargetSourceError, ConnectionError):
    """The teacher endpoint failed, refused the request, or stayed overloaded past the retry budget."""


class TokenVariableError(ValueError):
    """Only the old token variable (`OLD_TOKEN_ENV`) is set: the endpoint would answer 401."""


TOKEN_ENV = "DISTILLERY_TOKEN"
"""Environment variable with the endpoint's bearer token: the one `distill serve` reads too."""
OLD_TOKEN_ENV = "DISTILL_TOKEN"
"""The variable earlier versions of the trainer read; refused, naming `TOKEN_ENV`."""


def endpoint_token(explicit: str | None) -> str | None:
    """The bearer token for the teacher endpoint: ``explicit`` (``--token``), else ``$DISTILLERY_TOKEN``.

    Raises:
        TokenVariableError: neither is set but ``$DISTILL_TOKEN`` is (old instructions).
    """
    import os

    token = explicit or os.environ.get(TOKEN_ENV)
    if not token and os.environ.get(OLD_TOKEN_ENV):
        raise TokenVariableError(
            f"the endpoint token is read from ${TOKEN_ENV} (the variable `distill serve` reads). Got only "
            f"${OLD_TOKEN_ENV}, which is no longer read; export {TOKEN_ENV} with the same value (or pass --token)."
        )
    return token


class TeacherMismatchError(ValueError):
    """Two teachers that must be the same (store and endpoint, or a teacher that changed mid-run) differ."""


def _stack(per_view: Sequence[Mapping[str, np.ndarray | Tensor]], names: Sequence[str]) -> dict[str, Tensor]:
    """Per-view dicts of [C, H, W] arrays -> name -> Tensor[B, C, H, W] float32."""
    if not per_view:
        return {}
    out = {}
    for name in names:
        arrays = [item[name] for item in per_view]
        if isinstance(arrays[0], Tensor):
            out[name] = torch.stack([a.float() for a in arrays])
        else:
            out[name] = torch.from_numpy(np.stack([np.asarray(a, dtype=np.float32) for a in arrays]))
    return out


class TargetSource(ABC):
    """The trainer's one way of getting teacher targets.

    Attributes:
        names: the target names this source delivers (what the enabled losses need).
    """

    kind: str = ""
    names: list[str]

    @property
    @abstractmethod
    def fingerprint(self):
        """The teacher's `label_store.TeacherFingerprint`."""

    @property
    @abstractmethod
    def specs(self) -> list[Any]:
        """`label_store.TargetSpec` of every target the teacher can deliver (shapes give channels)."""

    @abstractmethod
    def get(
        self,
        views: Sequence[View],
        *,
        images: Tensor | None = None,
        image_paths: Sequence[str] | None = None,
        content_hashes: Sequence[str] | None = None,
    ) -> dict[str, Tensor]:
        """Targets of ``views``: name -> Tensor[B, C, H, W] float32 on the CPU (or the teacher's device).

        Args:
            views: the B views, in batch order.
            images: Tensor[B, 3, H, W], the rendered canvases (needed by the in-process teacher).
            image_paths: the B source image files (needed by the endpoint, which renders itself).
            content_hashes: `detcore.views.content_hash` of each decoded source image, to check
                that the endpoint saw the same pixels.
        """

    def worker_reader(self) -> StoreTargetReader | None:
        """A picklable reader for DataLoader workers, or None when targets are fetched per batch."""
        return None

    def readable_keys(self) -> set[tuple[int, int]] | None:
        """Keys `worker_reader` can serve (None: all)."""
        return None

    def outputs(self, targets: Mapping[str, Tensor]) -> DenseOutputs:
        """Targets by label-store name as the teacher's `DenseOutputs` (strides, reg_max and point
        convention from the fingerprint)."""
        fingerprint = self.fingerprint
        return DenseOutputs.from_targets(
            targets, strides=fingerprint.strides, reg_max=fingerprint.reg_max,
            point_offset=fingerprint_point_offset(fingerprint),
        )

    def complete(self, batch: Mapping[str, Any], device: str | torch.device | None = None) -> DenseOutputs:
        """The teacher's outputs for a `student_trainer.data.collate_train` batch, fetching what the
        workers did not read; on ``device`` when given."""
        targets = self._complete_targets(batch)
        if device is not None:
            targets = {k: v.to(device, non_blocking=True) for k, v in targets.items()}
        return self.outputs(targets)

    def _complete_targets(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        if batch["targets"] is not None:
            return dict(batch["targets"])
        partial = batch["partial_targets"]
        missing = batch["missing"]
        images = batch["images"]
        fetched = self.get(
            [batch["views"][i] for i in missing],
            images=None if images is None else images[missing],
            image_paths=[batch["image_paths"][i] for i in missing],
            content_hashes=[batch["content_hashes"][i] for i in missing],
        )
        out = {}
        for name in self.names:
            rows: list[Tensor] = []
            next_fetched = iter(range(len(missing)))
            for item in partial:
                if item is None:
                    rows.append(fetched[name][next(next_fetched)].float().cpu())
                else:
                    rows.append(torch.as_tensor(np.asarray(item[name], dtype=np.float32)))
            out[name] = torch.stack(rows)
        return out

    def flush(self) -> None:
        """Finish pending writes (called at every epoch end)."""

    def close(self) -> None:
        """Release connections or models."""

    def describe(self) -> dict[str, Any]:
        """Plain description for the run record."""
        return {"kind": self.kind, "names": list(self.names)}


class StoreSource(TargetSource):
    """Offline targets from a label store (the default).

    Args:
        url: store URL or path (local, or fsspec).
        names: target names to read.
        expected_fingerprint: refuse a store made by another teacher (`label_store.FingerprintMismatchError`).
        storage_options: fsspec options of a remote store (`DataConfig.storage_options`).
    """

    kind = "store"

    def __init__(
        self, url: str, names: Sequence[str], expected_fingerprint: Any = None,
        storage_options: Sequence[tuple[str, Any]] | Mapping[str, Any] = (),
    ) -> None:
        from label_store import open_store

        self.url = str(url)
        self.names = list(names)
        self.expected_fingerprint = expected_fingerprint
        self.storage_options = dict(storage_options)
        self.reader = open_store(self.url, expected_fingerprint=expected_fingerprint, storage_options=self.storage_options)
        self._keys = None

    @property
    def fingerprint(self):
        return self.reader.fingerprint

    @property
    def specs(self) -> list[Any]:
        return list(self.reader.targets)

    def keys(self) -> list[tuple[int, int]]:
        if self._keys is None:
            self._keys = [(int(i), int(v)) for i, v in self.reader.keys()]
        return list(self._keys)

    def stored_views(self) -> list[tuple[View, str]]:
        """Every committed view with the content hash recorded at precompute time."""
        table = self.reader.views()
        columns = {name: table.column(name).to_pylist() for name in ("image_id", "view_id", "view", "content_hash")}
        return [
            (_stored_view(text, int(image_id), int(view_id), self.url), str(digest))
            for image_id, view_id, text, digest in zip(*columns.values())
        ]

    def worker_reader(self) -> StoreTargetReader:
        return StoreTargetReader(self.url, self.names, expected_fingerprint=self.fingerprint,
                                 storage_options=self.storage_options)

    def readable_keys(self) -> set[tuple[int, int]]:
        return set(self.keys())

    def get(self, views, *, images=None, image_paths=None, content_hashes=None) -> dict[str, Tensor]:
        keys = [view.key for view in views]
        return _stack(self.reader.read_many(keys, names=self.names), self.names)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "store": self.url}


def _stored_view(text: str, image_id: int, view_id: int, url: str) -> View:
    """The manifest's ``view`` JSON of ``(image_id, view_id)`` as a `View`: where a stored view enters training, parsed once."""
    view = View.from_json(text)
    if view.key != (image_id, view_id):
        raise TargetSourceError(
            f"StoreSource expects the record of ({image_id}, {view_id}) to hold its own view. "
            f"Got view {view.key} in {url}; the store is inconsistent (run `distill store verify`)."
        )
    return view


class RemoteSource(TargetSource):
    """Online targets from the teacher endpoint (``POST {url}/v1/targets``).

    Args:
        url: endpoint base URL, e.g. ``http://teacher:8000``.
        names: target names to fetch (the request asks for their groups).
        token: bearer token.
        expected_fingerprint: refuse an endpoint serving another teacher.
        timeout_s: per-request timeout.
        max_retries: retries of a 503 or a connection failure before giving up.
        backoff_s, max_backoff_s: exponential backoff ``min(max, backoff * 2**attempt)``; a
            ``Retry-After`` header is honoured up to ``max_backoff_s``.
        transport: an ``httpx`` transport (tests).
    """

    kind = "remote"

    def __init__(
        self,
        url: str,
        names: Sequence[str],
        *,
        token: str | None = None,
        expected_fingerprint: Any = None,
        timeout_s: float = 120.0,
        max_retries: int = 6,
        backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
        transport: Any = None,
    ) -> None:
        import httpx

        from label_store import TargetSpec, TeacherFingerprint
        from label_store.wire import fingerprint_digest

        self.url = str(url).rstrip("/")
        self.names = list(names)
        self.settings = {
            "url": self.url, "token": token, "timeout_s": float(timeout_s), "max_retries": int(max_retries),
            "backoff_s": float(backoff_s), "max_backoff_s": float(max_backoff_s),
        }
        self.max_retries = int(max_retries)
        self.backoff_s = float(backoff_s)
        self.max_backoff_s = float(max_backoff_s)
        self.retries_done = 0
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        kwargs = {"transport": transport} if transport is not None else {}
        self._client = httpx.Client(base_url=self.url, timeout=timeout_s, headers=headers, **kwargs)
        response = self._request("GET", "/v1/teacher", what="the teacher description")
        try:
            info = response.json()
            self._fingerprint = TeacherFingerprint.from_dict(info["fingerprint"])
            self._specs = [TargetSpec.from_dict(row) for row in info["targets"]]
        except (ValueError, KeyError, TypeError) as error:
            raise RemoteSourceError(
                f"RemoteSource(url=) expects GET {self.url}/v1/teacher to return fingerprint, targets and digest. "
                f"Got {response.text[:200]!r}: {error}."
            ) from error
        self.digest = fingerprint_digest(self._fingerprint.to_dict())
        if info.get("digest") not in (None, self.digest):
            raise RemoteSourceError(
                f"RemoteSource expects the endpoint's digest to match its fingerprint. Got {info.get('digest')} != {self.digest} from {self.url}."
            )
        if expected_fingerprint is not None:
            differences = expected_fingerprint.diff(self._fingerprint)
            if differences:
                raise TeacherMismatchError(
                    f"RemoteSource(url=) expects the teacher of the store. {self.url} serves another one:\n  - "
                    + "\n  - ".join(d.replace("store has", "store/config has").replace("caller expects", "endpoint has") for d in differences)
                )
        available = {spec.name for spec in self._specs}
        missing = [n for n in self.names if n not in available]
        if missing:
            raise RemoteSourceError(f"RemoteSource(names=) expects targets the endpoint serves ({sorted(available)}). Missing {missing}.")

    @property
    def fingerprint(self):
        return self._fingerprint

    @property
    def specs(self) -> list[Any]:
        return list(self._specs)

    def _delay(self, attempt: int, retry_after: str | None) -> float:
        if retry_after is not None:
            try:
                return min(self.max_backoff_s, max(0.0, float(retry_after)))
            except ValueError:
                pass
        return min(self.max_backoff_s, self.backoff_s * (2**attempt))

    def _request(self, method: str, path: str, *, what: str, **kwargs):
        import httpx

        last = ""
        for attempt in range(self.max_retries + 1):
            retry_after = None
            try:
                response = self._client.request(method, path, **kwargs)
            except (httpx.TransportError,) as error:  # connect/read/write errors, timeouts, protocol errors
                last = f"{type(error).__name__}: {error}"
            else:
                if response.status_code == 200:
                    return response
                if response.status_code not in (502, 503, 504):
                    hint = " (check --token)" if response.status_code in (401, 403) else ""
                    raise RemoteSourceError(
                        f"RemoteSource expects 200 from {method} {self.url}{path} for {what}. "
                        f"Got {response.status_code}{hint}: {response.text[:300]}"
                    )
                last = f"HTTP {response.status_code}"
                retry_after = response.headers.get("Retry-After")
            if attempt == self.max_retries:
                break
            self.retries_done += 1
            time.sleep(self._delay(attempt, retry_after))
        raise RemoteSourceError(
            f"RemoteSource gave up on {method} {self.url}{path} for {what} after {self.max_retries + 1} attempts. "
            f"Last: {last}. Is the endpoint up (distill serve)? Raise --retries or retry later."
        )

    def get(self, views, *, images=None, image_paths=None, content_hashes=None) -> dict[str, Tensor]:
        views = list(views)
        if not views:
            return {}
        entries = self.fetch(views, image_paths=image_paths, content_hashes=content_hashes)
        return _stack([e["targets"] for e in entries], self.names)

    def fetch(
        self, views: Sequence[View], *, image_paths: Sequence[str] | None, content_hashes: Sequence[str | None] | None = None,
        names: Sequence[str] | None = None,
    ) -> list[dict[str, Any]]:
        """One request for ``views``: per view ``{"image_id", "view_id", "content_hash", "targets"}``.

        ``targets`` maps each of ``names`` (default: this source's) to a float32 array[C, H, W].
        """
        from label_store.wire import FINGERPRINT_HEADER, fingerprint_digest, unpack_targets

        views = list(views)
        names = list(self.names if names is None else names)
        groups = sorted({n.split("/", 1)[0] for n in names}, key=TARGET_GROUPS.index)
        if image_paths is None or len(image_paths) != len(views):
            raise TargetSourceError(
                f"RemoteSource.get(image_paths=) expects one image file per view ({len(views)}). "
                f"Got {None if image_paths is None else len(image_paths)}."
            )
        files = [("images", (Path(p).name, Path(p).read_bytes(), "application/octet-stream")) for p in image_paths]
        data = {"views": json.dumps([v.to_dict() for v in views]), "targets": ",".join(groups)}
        keys = [v.key for v in views]
        response = self._request("POST", "/v1/targets", what=f"views {keys[:4]}{'...' if len(keys) > 4 else ''}", data=data, files=files)
        header = response.headers.get(FINGERPRINT_HEADER)
        if header is not None and header != self.digest:
            raise TeacherMismatchError(
                f"RemoteSource expects the teacher it started with (fingerprint {self.digest[:12]}). "
                f"{self.url} now answers with {header[:12]}; the endpoint's teacher changed mid-run."
            )
        fingerprint, _, entries = unpack_targets(response.content)
        if fingerprint_digest(fingerprint) != self.digest:
            raise TeacherMismatchError(f"RemoteSource expects targets from the teacher {self.digest[:12]}. The body names another teacher.")
        got = [(e["image_id"], e["view_id"]) for e in entries]
        if got != keys:
            raise RemoteSourceError(f"RemoteSource expects targets for views {keys} in order. Got {got}.")
        if content_hashes is not None:
            for entry, expected in zip(entries, content_hashes):
                if expected is not None and entry["content_hash"] != expected:
                    raise RemoteSourceError(
                        f"RemoteSource expects the endpoint to render the pixels the trainer loaded. Image "
                        f"{entry['image_id']}: endpoint hash {entry['content_hash']} != local {expected}."
                    )
        for entry in entries:
            missing = [n for n in names if n not in entry["targets"]]
            if missing:
                raise RemoteSourceError(f"RemoteSource expects targets {names} from {self.url}. Got no {missing} for view {(entry['image_id'], entry['view_id'])}.")
            entry["targets"] = {n: np.asarray(entry["targets"][n], dtype=np.float32) for n in names}
        return entries

    def close(self) -> None:
        self._client.close()

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "endpoint": self.url, "retries": self.retries_done}


class ReadThroughReader:
    """The read-through source's reader in the DataLoader workers: the store, then the endpoint.

    Picklable; the store reader and the HTTP client are opened lazily once per process.
    `read` serves what the store holds (None for a miss); `fetch_many` asks the endpoint
    for a batch's misses in one request, after looking again at the store (a part
    committed since, by this run at an epoch end or by another trainer, is read, not
    fetched). A fetched view carries every target of the store (``fill``) when the store
    can be filled, so that the training process commits it (`ReadThroughSource`).

    Args:
        store: the store's `StoreTargetReader` (the trainer's target names).
        remote_settings: `RemoteSource.settings`.
        fill_names: every target name of the store (fetched too), or None not to fill.
        fingerprint: the store's teacher, checked against the endpoint's in each process.
    """

    def __init__(self, store: StoreTargetReader, remote_settings: Mapping[str, Any], fill_names: Sequence[str] | None, fingerprint: Any) -> None:
        self.store = store
        self.names = list(store.names)
        self.remote_settings = dict(remote_settings)
        self.fill_names = None if fill_names is None else list(fill_names)
        self.fingerprint = fingerprint
        self._remote: RemoteSource | None = None
        self._pid: int | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_remote"] = None
        state["_pid"] = None
        return state

    @property
    def remote(self) -> RemoteSource:
        import os

        if self._remote is None or self._pid != os.getpid():
            settings = dict(self.remote_settings)
            self._remote = RemoteSource(settings.pop("url"), self.names, expected_fingerprint=self.fingerprint, **settings)
            self._pid = os.getpid()
        return self._remote

    def read(self, image_id: int, view_id: int) -> dict[str, np.ndarray] | None:
        """name -> float32 array[C, H, W] from the store, or None when the store lacks the view."""
        if (image_id, view_id) not in self.store.reader:
            return None
        return self.store.read(image_id, view_id)

    def fetch_many(
        self, views: Sequence[View], image_paths: Sequence[str], content_hashes: Sequence[str | None]
    ) -> list[tuple[dict[str, np.ndarray], dict[str, np.ndarray] | None]]:
        """Per view ``(targets, fill)``: the trainer's targets, and every store target when fetched (None when read)."""
        self.store.refresh()
        out: list[tuple[dict[str, np.ndarray], dict[str, np.ndarray] | None] | None] = [None] * len(views)
        misses = []
        for index, view in enumerate(views):
            if view.key in self.store.reader:
                out[index] = (self.store.read(*view.key), None)
            else:
                misses.append(index)
        if misses:
            names = self.fill_names if self.fill_names is not None else self.names
            entries = self.remote.fetch(
                [views[i] for i in misses], image_paths=[image_paths[i] for i in misses],
                content_hashes=[content_hashes[i] for i in misses], names=names,
            )
            for index, entry in zip(misses, entries):
                full = entry["targets"]
                out[index] = ({n: full[n] for n in self.names}, full if self.fill_names is not None else None)
        return out

    def close(self) -> None:
        if self._remote is not None:
            self._remote.close()


class ReadThroughSource(TargetSource):
    """The store first; views the store does not hold are fetched from the endpoint and committed to the store.

    The endpoint must serve the store's teacher (checked at start, `TeacherMismatchError`).
    The fetches run in the DataLoader workers (`ReadThroughReader`, one request per batch
    of misses); the training process buffers what they fetched in a `label_store.StoreFiller`,
    which commits parts of ``fill_part_views`` views (``origin="endpoint"``) in a background
    thread when full and at every epoch end (`flush`), each view once even when several
    trainers fill the store. The next epoch reads those views from the store.

    Args:
        store, remote: the two sources.
        fill: commit fetched views to the store (needs the endpoint to serve every target
            the store holds; otherwise a warning, and nothing is written).
        fill_part_views: N, views per committed part.
    """

    kind = "read-through"

    def __init__(self, store: StoreSource, remote: RemoteSource, *, fill: bool = True, fill_part_views: int = 64) -> None:
        differences = store.fingerprint.diff(remote.fingerprint)
        if differences:
            raise TeacherMismatchError(
                f"ReadThroughSource expects the endpoint {remote.url} to serve the teacher of the store {store.url}. "
                "Differences:\n  - " + "\n  - ".join(differences)
            )
        self.store = store
        self.remote = remote
        self.names = list(store.names)
        self.fetched_views = 0
        self.filler = None
        self.fill_names: list[str] | None = None
        if fill:
            stored = [spec.name for spec in store.specs]
            served = {spec.name: tuple(spec.shape) for spec in remote.specs}
            unserved = [spec.name for spec in store.specs if served.get(spec.name) != tuple(spec.shape)]
            if unserved:
                logger.warning(
                    "read-through: the endpoint %s does not serve the store's targets %s; fetched views are not written to %s",
                    remote.url, unserved, store.url,
                )
            else:
                from label_store.fill import StoreFiller

                self.fill_names = stored
                self.filler = StoreFiller(
                    store.url, expected_fingerprint=store.fingerprint, part_views=fill_part_views, background=True,
                    storage_options=store.storage_options,
                )

    @property
    def fingerprint(self):
        return self.store.fingerprint

    @property
    def specs(self) -> list[Any]:
        return self.store.specs

    def worker_reader(self) -> ReadThroughReader:
        return ReadThroughReader(self.store.worker_reader(), self.remote.settings, self.fill_names, self.store.fingerprint)

    def readable_keys(self) -> None:
        return None  # the worker reader answers every key: from the store or from the endpoint

    def _fill(self, views: Sequence[View], content_hashes: Sequence[str], fills: Sequence[Mapping[str, np.ndarray]]) -> None:
        if self.filler is None:
            return
        for view, digest, targets in zip(views, content_hashes, fills):
            record = {"image_id": view.image_id, "view_id": view.view_id, "view": view,
                      "content_hash": digest, "valid_region": list(view.valid_region)}
            self.filler.add(record, targets)

    def complete(self, batch: Mapping[str, Any], device: str | torch.device | None = None) -> DenseOutputs:
        fetched = batch.get("fetched") or []
        self.fetched_views += len(fetched)
        self._fill([batch["views"][i] for i, _ in fetched], [batch["content_hashes"][i] for i, _ in fetched], [f for _, f in fetched])
        return super().complete(batch, device)

    def get(self, views, *, images=None, image_paths=None, content_hashes=None) -> dict[str, Tensor]:
        views = list(views)
        stored = self.store.readable_keys()
        in_store = [i for i, v in enumerate(views) if v.key in stored]
        remote = [i for i, v in enumerate(views) if v.key not in stored]
        parts: dict[int, dict[str, Tensor]] = {}
        if in_store:
            got = self.store.get([views[i] for i in in_store])
            for j, i in enumerate(in_store):
                parts[i] = {n: got[n][j] for n in self.names}
        if remote:
            entries = self.remote.fetch(
                [views[i] for i in remote],
                image_paths=None if image_paths is None else [image_paths[i] for i in remote],
                content_hashes=None if content_hashes is None else [content_hashes[i] for i in remote],
                names=self.fill_names or self.names,
            )
            self.fetched_views += len(remote)
            for i, entry in zip(remote, entries):
                parts[i] = {n: torch.from_numpy(entry["targets"][n]) for n in self.names}
            if self.fill_names is not None:
                self._fill([views[i] for i in remote], [e["content_hash"] for e in entries], [e["targets"] for e in entries])
        return _stack([parts[i] for i in range(len(views))], self.names)

    def flush(self) -> None:
        """Commit the buffered fetched views and wait for the commits in flight."""
        if self.filler is not None:
            self.filler.flush()

    def close(self) -> None:
        try:
            if self.filler is not None:
                self.filler.close()
        finally:
            self.remote.close()

    def describe(self) -> dict[str, Any]:
        filled = {}
        if self.filler is not None:
            filled = {"committed_views": self.filler.committed_views, "skipped_views": self.filler.skipped_views}
        return {**super().describe(), "store": self.store.url, "endpoint": self.remote.url, "fetched_views": self.fetched_views, **filled}


class InProcessTeacherSource(TargetSource):
    """The teacher in the training process: the online baseline offline results are compared with.

    Loads the checkpoint with `detcore.teacher.load_teacher` (native or imported) and runs it under
    ``torch.no_grad`` on the very canvases the student is given (same views, same pixels).
    Never the default; it costs a teacher forward per step and the teacher's memory.

    Args:
        checkpoint: the teacher's detcore checkpoint.
        names: target names to return.
        device: where the teacher runs.
        dataset_classes: the training categories; the teacher's classes are mapped to them by
            name (`detcore.classes.map_classes`, as `distill precompute` does), so targets and
            fingerprint equal a store's of the same teacher. None keeps the teacher's classes.
        class_map: teacher name -> dataset name renames.
        allow_missing_classes: accept categories the teacher lacks (masked out of class distillation).
        canvas_hw: the canvas the run renders views on, recorded in the fingerprint as a store made
            at it records it (the teacher is fully convolutional); None keeps the checkpoint's.

    Raises:
        detcore.classes.ClassMappingError: classes that do not map (names them).
    """

    kind = "inprocess"

    def __init__(
        self,
        checkpoint: str,
        names: Sequence[str],
        device: str | torch.device = "cpu",
        *,
        dataset_classes: Sequence[str] | None = None,
        class_map: Mapping[str, str] | None = None,
        allow_missing_classes: bool = False,
        canvas_hw: Sequence[int] | None = None,
    ) -> None:
        from detcore.classes import map_classes
        from detcore.teacher import load_teacher
        from label_store import TargetSpec, TeacherFingerprint

        self.checkpoint = str(checkpoint)
        self.names = list(names)
        self.device = torch.device(device)
        self.teacher = load_teacher(self.checkpoint, device=str(self.device), precision="fp32")
        if dataset_classes is not None:
            self.teacher.use_class_mapping(
                map_classes(self.teacher.teacher_classes, dataset_classes, class_map=class_map, allow_missing=allow_missing_classes)
            )
        fingerprint = self.teacher.fingerprint()
        if canvas_hw is not None:
            fingerprint["canvas_hw"] = [int(v) for v in canvas_hw]
        self._fingerprint = TeacherFingerprint.from_dict(fingerprint)
        groups = [g for g in self.teacher.available_groups if g != "edges" or "box" not in self.teacher.available_groups]
        self._specs = [TargetSpec(s.name, s.shape, "fp32") for s in self.teacher.target_specs(groups, canvas_hw)]
        self.with_backbone = any(n.startswith("backbone/") for n in self.names)
        self.groups = tuple(sorted({n.split("/", 1)[0] for n in self.names}, key=TARGET_GROUPS.index))
        self.teacher_seconds = 0.0

    @property
    def fingerprint(self):
        return self._fingerprint

    @property
    def specs(self) -> list[Any]:
        return list(self._specs)

    def _forward(self, views, images) -> DenseOutputs:
        if images is None or images.ndim != 4 or images.shape[0] != len(views):
            raise TargetSourceError(
                f"InProcessTeacherSource.get(images=) expects the rendered Tensor[B, 3, H, W] of the {len(views)} views. "
                f"Got {None if images is None else tuple(images.shape)}."
            )
        start = time.perf_counter()
        outputs = self.teacher.forward(images, backbone=self.with_backbone)
        self.teacher_seconds += time.perf_counter() - start
        return outputs

    def get(self, views, *, images=None, image_paths=None, content_hashes=None) -> dict[str, Tensor]:
        targets = self._forward(views, images).to_targets(self.groups)
        return {name: targets[name].float() for name in self.names}

    def complete(self, batch: Mapping[str, Any], device: str | torch.device | None = None) -> DenseOutputs:
        # The whole batch, on the teacher's device: no CPU round trip, no encoding to names.
        outputs = map_outputs(self._forward(batch["views"], batch["images"]), lambda t: t.float())
        return outputs if device is None else map_outputs(outputs, lambda t: t.to(device, non_blocking=True))

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "teacher": self.checkpoint, "teacher_seconds": round(self.teacher_seconds, 3)}


def build_source(
    config, names: Sequence[str], *, device: str | torch.device = "cpu", expected_fingerprint: Any = None,
    dataset_classes: Sequence[str] | None = None,
) -> TargetSource:
    """The source a run config asks for (`student_trainer.config.SourceConfig`); ``dataset_classes``
    (the training categories) are what an in-process teacher's classes are mapped to."""
    source = config.source
    token = endpoint_token(source.token) if source.kind in ("remote", "read-through") else None
    kind = source.kind
    if kind == "store":
        return StoreSource(config.data.store, names, expected_fingerprint=expected_fingerprint,
                           storage_options=config.data.storage_options)
    if kind == "remote":
        return RemoteSource(
            source.endpoint, names, token=token, expected_fingerprint=expected_fingerprint,
            timeout_s=source.timeout_s, max_retries=source.max_retries,
        )
    if kind == "read-through":
        store = StoreSource(config.data.store, names, expected_fingerprint=expected_fingerprint,
                            storage_options=config.data.storage_options)
        remote = RemoteSource(
            source.endpoint, names, token=token, expected_fingerprint=store.fingerprint,
            timeout_s=source.timeout_s, max_retries=source.max_retries,
        )
        return ReadThroughSource(store, remote)
    if kind == "inprocess":
        from detcore.classes import read_class_map

        canvas_hw = config.data.canvas
        if canvas_hw is None and config.data.store:
            # Views come from the store: the teacher runs on (and records) the store's canvas.
            canvas_hw = StoreSource(config.data.store, [], storage_options=config.data.storage_options).fingerprint.canvas_hw
        return InProcessTeacherSource(
            source.teacher, names, device=device, dataset_classes=dataset_classes,
            class_map=read_class_map(source.class_map) if source.class_map else None,
            allow_missing_classes=source.allow_missing_classes, canvas_hw=canvas_hw,
        )
    raise ValueError(f"build_source(config.source.kind=) expects one of store, remote, read-through, inprocess. Got {kind!r}.")


__all__ = [
    "InProcessTeacherSource",
    "ReadThroughSource",
    "RemoteSource",
    "RemoteSourceError",
    "StoreSource",
    "TargetSource",
    "TargetSourceError",
    "TeacherMismatchError",
    "TokenVariableError",
    "build_source",
    "endpoint_token",
]
