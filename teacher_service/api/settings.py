"""Settings of the online teacher endpoint, read from ``DISTILLERY_*`` environment variables.

Unsafe combinations are refused at construction, before anything is loaded or bound:
a server without a bearer token starts only when ``auth_disabled`` is set explicitly
*and* it listens on a loopback address. The interactive API docs are off by default on
any other address.

Memory of one process is bounded by the limits here: at most ``limit_concurrency``
requests of at most ``max_request_bytes`` each, and at most ``decode_workers`` images
decoded at once, each of at most ``max_image_pixels`` pixels (checked on the file's
header, before decoding).
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MIN_TOKEN_LENGTH = 16
LOOPBACK_NAMES = frozenset({"localhost", "ip6-localhost", "ip6-loopback"})


def is_loopback(host: str) -> bool:
    """True for ``127.0.0.0/8``, ``::1`` and the usual loopback host names."""
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class ServeSettings(BaseSettings):
    """Configuration of one endpoint process (or one Ray Serve replica)."""

    model_config = SettingsConfigDict(
        env_prefix="DISTILLERY_",
        use_attribute_docstrings=True,
        frozen=True,
        extra="forbid",
    )

    teacher: Path
    """Teacher checkpoint (``detcore.checkpoint.save_checkpoint`` format). Env: DISTILLERY_TEACHER."""
    host: str = "127.0.0.1"
    """Address to bind. Anything but loopback requires a token."""
    port: int = Field(default=8000, ge=0, le=65535)
    """TCP port to bind (0 picks a free one)."""
    token: SecretStr | None = None
    """Bearer token every /v1 request must carry (``Authorization: Bearer <token>``)."""
    auth_disabled: bool = False
    """Serve /v1 without a token; accepted only when ``host`` is a loopback address."""
    max_batch: int = Field(default=8, ge=1, le=1024)
    """Largest number of views in one teacher forward pass (dynamic batching)."""
    max_wait_ms: float = Field(default=5.0, ge=0.0, le=10_000.0)
    """Longest wait of a partial batch for views that other requests are still decoding."""
    max_queue: int = Field(default=64, ge=1, le=1_000_000)
    """Views admitted but not yet in a forward pass; a request that would exceed it gets 503."""
    max_request_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    """Largest request body; larger ones get 413 (checked on Content-Length and while reading)."""
    max_field_bytes: int = Field(default=1024 * 1024, ge=1024)
    """Largest text field of a request (``views`` JSON, ``targets``); larger ones get 413 while reading."""
    max_image_bytes: int = Field(default=32 * 1024 * 1024, ge=1024)
    """Largest image file of a request; larger ones get 413 while reading."""
    max_image_pixels: int = Field(default=40_000_000, ge=1, le=1_000_000_000)
    """Most pixels (height x width, read from the file's header before decoding) of an uploaded
    image; more gets 422 ``image-too-large``. Pillow's own decompression-bomb limit
    (``PIL.Image.MAX_IMAGE_PIXELS``, 89.5 million by default) is an error in the server too."""
    decode_workers: int = Field(default=2, ge=1, le=64)
    """Threads that decode and render uploaded images; no more images than this are decoded at once."""
    body_timeout_s: float = Field(default=60.0, gt=0.0, le=3600.0)
    """The whole request body must arrive within this many seconds of the request's start; else 408."""
    limit_concurrency: int = Field(default=64, ge=1, le=100_000)
    """Most connections and requests in flight (uvicorn ``limit_concurrency``); beyond it 503."""
    timeout_keep_alive_s: int = Field(default=5, ge=1, le=3600)
    """Idle keep-alive connections are closed after this many seconds (uvicorn ``timeout_keep_alive``)."""
    docs_access: Literal["open", "token", "off"] | None = None
    """``/docs``, ``/redoc`` and ``/openapi.json``: ``open``, ``token`` (bearer token needed) or ``off``;
    None: ``open`` on a loopback host, ``off`` elsewhere."""
    metrics_access: Literal["open", "token"] = "open"
    """``/metrics``: ``open`` (for scrapers without credentials) or ``token`` (bearer token needed)."""
    device: str = "auto"
    """Torch device of the teacher: ``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:1`` ..."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Autocast of the forward pass, as in precompute: ``auto`` is bf16/fp16 on GPU, fp32 on CPU."""
    canvas_hw: tuple[int, int] | None = None
    """Canvas ``(H, W)`` views must use; None: the checkpoint's (set it to the store's canvas)."""
    codecs: dict[str, str] = Field(default_factory=dict)
    """Codec overrides by target group, as given to the store (JSON in the env:
    ``DISTILLERY_CODECS='{"fpn": "int8-channel"}'``)."""
    torch_threads: int | None = Field(default=None, ge=1)
    """Intra-op threads of the forward pass on the CPU (None: torch's default)."""
    annotations: Path | None = None
    """COCO annotation file whose categories the served ``cls`` targets hold, mapped from the
    teacher's classes by name as `distill precompute` maps them (the store's annotations);
    None serves the teacher's own classes."""
    class_map: Path | None = None
    """JSON file of teacher class name -> dataset category name renames (with ``annotations``)."""
    allow_missing_classes: bool = False
    """Accept dataset categories the teacher lacks (with ``annotations``), as precompute does."""
    retry_after_s: int = Field(default=1, ge=1, le=3600)
    """Smallest Retry-After (seconds) sent with 503 answers."""
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    """uvicorn log level."""

    @model_validator(mode="after")
    def _classes_need_annotations(self) -> "ServeSettings":
        if self.annotations is None and (self.class_map is not None or self.allow_missing_classes):
            raise ValueError(
                "ServeSettings(class_map=, allow_missing_classes=) expect annotations: the dataset whose categories the "
                "teacher's classes map to. Got none; pass --annotations FILE (the store's COCO annotations)."
            )
        return self

    @model_validator(mode="after")
    def _refuse_unsafe(self) -> "ServeSettings":
        token = None if self.token is None else self.token.get_secret_value()
        if self.auth_disabled:
            if not is_loopback(self.host):
                raise ValueError(
                    f"ServeSettings(auth_disabled=True) expects a loopback host. Got host={self.host!r}; "
                    "set a token (DISTILLERY_TOKEN or --token) to listen on other addresses."
                )
            return self
        if token is None or token == "":
            raise ValueError(
                "ServeSettings(token=) expects a bearer token. Got none; set DISTILLERY_TOKEN (or --token), "
                "or pass --no-auth (DISTILLERY_AUTH_DISABLED=1) with a loopback --host."
            )
        if len(token) < MIN_TOKEN_LENGTH or token.strip() != token:
            raise ValueError(
                f"ServeSettings(token=) expects at least {MIN_TOKEN_LENGTH} characters without surrounding "
                f"whitespace. Got {len(token)} characters; generate one with "
                "`python -c 'import secrets; print(secrets.token_urlsafe(32))'`."
            )
        return self

    @property
    def auth_required(self) -> bool:
        return not self.auth_disabled

    @property
    def docs(self) -> Literal["open", "token", "off"]:
        """`docs_access` in force (its default depends on the host)."""
        if self.docs_access is not None:
            return self.docs_access
        return "open" if is_loopback(self.host) else "off"
