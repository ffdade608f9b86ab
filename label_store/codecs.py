"""Target codecs: how one view's float32 target becomes stored numbers, and back.

Legend: C channels, H x W one level's map, Pc quantization parameters per view (0 for
float storage, 1 for ``view`` scaling, C for ``channel`` and ``std`` scaling).

A codec has two halves, named together as ``<storage>[+<compressor>]``:

storage (done by this module, in numpy):
    ``fp32``            float32, exact (the reference).
    ``fp16``            float16; relative error <= 2**-11. Values beyond +-65504 are refused.
    ``int<b>-channel``  b-bit codes (2 <= b <= 8, stored as uint8) with a scale and an
                        offset per view and channel: ``x = offset_c + scale_c * code``,
                        ``scale_c = (max_c - min_c) / (2**b - 1)``.
    ``int<b>-view``     the same with one scale and offset per view.
    ``int<b>-std<k>``   uniform step ``std(view) / k`` (std over the whole view target),
                        offset ``min_c`` per channel; where a channel's range does not fit
                        ``2**b - 1`` steps its step widens to ``range_c / (2**b - 1)``.
                        The step, not the bit budget, sets the error (and entropy coding
                        sets the size), so ``k`` is a finer knob than ``b``.
    ``pca-std<k>``      transform coding of the channels: one orthonormal basis per target
                        and level for the whole store (`ChannelBasis`: the principal axes of
                        the channels, fitted on the first views by `fit_channel_basis` and
                        held in the store's schema, `label_store.schema.TargetSpec.transform`),
                        coefficients ``y = V^T (x - mean)`` per point rounded with one step per
                        view, ``rms(x) / k`` (widened to ``max |y| / 127`` where a coefficient
                        would not fit), as signed 8-bit codes stored zigzag-mapped (0, -1, 1,
                        ... -> 0, 1, 2, ...); ``x = mean + V (step * code)``. The step is the
                        same for every coefficient, so the bits follow the variance: the few
                        leading components take most of the bytes and the many small ones
                        round to 0, which entropy coding (bit shuffle suits these small
                        codes) removes. Error per channel c: ``sum_j |V_cj| * step / 2``.
    ``pca-std<k>-dct``  the same coefficients, then also transformed along the map: each
                        coefficient plane ``[H, W]`` goes through the orthonormal 2-D DCT-II
                        (``D_H y D_W^T``), so the smooth, spatially correlated leading
                        components gather into few large values and the rest round to 0.
                        One step per view, ``rms(x) / k`` (widened to ``max |z| / 32767``),
                        signed 16-bit codes stored zigzag-mapped as uint16; decoding applies
                        ``D_H^T z D_W`` then the basis. Both transforms are orthonormal, so the
                        squared error is that of rounding every coefficient, spread over the
                        map; the elementwise bound multiplies the channel term above by the
                        DCT matrices' column sums of ``|D|``.
    Every integer storage rounds to nearest: ``|x - decoded| <= scale_c / 2`` (plus float32
    rounding), which is the error each codec states (`TargetCodec.error_bound`).
    Logits are quantized as logits, never as probabilities.

    ``-floor<X>`` last in an integer storage (``int5-view-dchw-floor-8``): values below X
    are raised to X before quantization. Class logits far below zero carry almost nothing
    for the losses that read them (BCE with sigmoid targets, KD at T=2), and once they all
    share code 0 entropy coding removes them; the error bound grows by ``X - x`` where
    ``x < X`` (`TargetCodec.error_bound`), and the quantization step shrinks with the range.

    ``-d<axes>`` after an integer storage (``int6-view-dbhw``, ``int5-view-dhw``): lossless
    prediction of the codes before compression. The codes are differenced (mod 256) along
    each named axis in turn, ``c`` channels, ``h`` rows, ``w`` columns (first slice kept),
    and the residuals zigzag-mapped (0, -1, 1, -2, ... -> 0, 1, 2, 3, ...), so a smooth map
    becomes mostly small numbers that entropy coding packs tightly. Decoding undoes both
    exactly (cumulative sums mod 256), so the error is the storage's own. Differencing
    along ``c`` suits one scale for all channels (``view`` scaling) and targets whose
    neighbouring channels are alike. ``b`` (in place of ``c``) differences the channels
    in 4 equal groups, each group's first channel kept: the R + 1 bins of each of a box
    target's 4 edges, so one edge's last bin does not predict the next edge's first
    (1.2% fewer bytes than ``c`` on a trained teacher's box targets). It needs a
    channel count divisible by 4.

compressor (a zarr v3 core codec in the array metadata, after the ``bytes`` serializer):
    (none)                    raw bytes
    ``zstd<L>``               ``zstd`` at level L
    ``blosc-zstd<L>-shuffle``     ``blosc`` (zstd, level L) with byte shuffle
    ``blosc-zstd<L>-bitshuffle``  ``blosc`` (zstd, level L) with bit shuffle
Every stored chunk also ends with a ``crc32c`` codec, so a flipped byte fails loudly.

Examples: ``pca-std4+blosc-zstd5-bitshuffle``, ``pca-std2-dct+blosc-zstd5-bitshuffle``, ``fp32``, ``fp16+blosc-zstd5-shuffle``, ``int8-channel+zstd5``,
``int5-view+zstd5``, ``int8-std8+zstd5``, ``int6-view-dbhw+zstd15``, ``int5-view-dchw-floor-8+zstd15``.

Codec profiles (`profile_codec`): ``small`` keeps a codec as named; ``fast`` keeps its
storage (the same quantizer and prediction, so the same decoded values) and lowers its
compression level to `FAST_ZSTD_LEVEL` (zstd) or `FAST_BLOSC_LEVEL` (blosc), for writers
that must keep up with a GPU teacher.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

FLOAT16_MAX = 65504.0

_STORAGE_RE = re.compile(
    r"^(?:(?P<float>fp32|fp16)|pca-std(?P<pk>[1-9][0-9]{0,3})(?P<dct>-dct)?|int(?P<bits>[2-8])-(?P<scale>channel|view|std(?P<k>[1-9][0-9]{0,3}))(?:-d(?P<predict>(?=[bchw])[bc]?h?w?))?(?:-floor(?P<floor>-?[0-9]{1,4}(?:\.[0-9]{1,4})?))?)$"
)
_AXES = {"c": 0, "h": 1, "w": 2}
EDGE_GROUPS = 4
"""Channel groups of the ``b`` prediction axis: a box target's 4 edges."""
REGION_LAYOUTS = ("points", "channels")
"""Orders of a region target's stored values (`TargetCodec.stored_codes`): ``points`` (each kept
point's C values together; schema 4 stores) or ``channels`` (each channel's kept points
together; schema 3 stores)."""
CODEC_PROFILES = ("small", "fast")
"""Codec profiles of `profile_codec` (``--codec-profile``)."""
FAST_ZSTD_LEVEL = 1
"""zstd level of the ``fast`` profile."""
FAST_BLOSC_LEVEL = 1
"""blosc (zstd) level of the ``fast`` profile."""
_COMPRESSOR_RE = re.compile(r"^(?:zstd(?P<zlevel>-?[0-9]{1,2})|blosc-zstd(?P<blevel>[0-9])-(?P<shuffle>shuffle|bitshuffle))$")


PCA_CODE_PEAK = 127
"""Largest coefficient code magnitude of ``pca-std<k>`` (signed 8-bit codes)."""
DCT_CODE_PEAK = 32767
"""Largest coefficient code magnitude of ``pca-std<k>-dct`` (signed 16-bit codes)."""


@functools.lru_cache(maxsize=64)
def dct_matrix(n: int) -> np.ndarray:
    """The orthonormal DCT-II matrix of size n (float32 array[n, n]): ``z = D @ y`` along one axis, ``y = D.T @ z``."""
    k = np.arange(n, dtype=np.float64)[:, None]
    i = np.arange(n, dtype=np.float64)[None, :]
    matrix = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    matrix[0] /= np.sqrt(2.0)
    matrix = matrix.astype(np.float32)
    matrix.setflags(write=False)
    return matrix


@dataclass(frozen=True, slots=True)
class ChannelBasis:
    """A per-store orthonormal basis of one target's C channels (``pca-std<k>`` codecs).

    Held as little-endian float32 bytes so that it compares, hashes and travels in the
    store's schema as it is (`to_dict`: base64).
    """

    channels: int
    """C."""
    mean: bytes
    """float32 array[C]: the channel means subtracted before the projection."""
    basis: bytes
    """float32 array[C, C], row-major: column j is component j, by decreasing variance."""

    def __post_init__(self) -> None:
        if not isinstance(self.channels, int) or isinstance(self.channels, bool) or self.channels <= 0:
            raise ValueError(f"ChannelBasis(channels=) expects a positive int. Got {self.channels!r}.")
        c = self.channels
        if not isinstance(self.mean, bytes) or len(self.mean) != 4 * c:
            raise ValueError(f"ChannelBasis(mean=) expects {4 * c} bytes (float32[{c}]). Got {type(self.mean).__name__} of {len(self.mean) if isinstance(self.mean, bytes) else '?'}.")
        if not isinstance(self.basis, bytes) or len(self.basis) != 4 * c * c:
            raise ValueError(f"ChannelBasis(basis=) expects {4 * c * c} bytes (float32[{c}, {c}]). Got {type(self.basis).__name__}.")
        mean, vectors = self.mean_array, self.basis_array
        if not (np.isfinite(mean).all() and np.isfinite(vectors).all()):
            raise ValueError("ChannelBasis expects finite mean and basis values. Got NaN or inf.")
        gram = vectors.astype(np.float64).T @ vectors.astype(np.float64)
        deviation = float(np.abs(gram - np.eye(c)).max())
        if deviation > 1e-4:
            raise ValueError(f"ChannelBasis(basis=) expects orthonormal columns. Got |V^T V - I| up to {deviation:.3g}.")

    @classmethod
    def from_arrays(cls, mean: np.ndarray, basis: np.ndarray) -> "ChannelBasis":
        """From float arrays ``mean[C]`` and ``basis[C, C]`` (columns: components)."""
        mean = np.ascontiguousarray(mean, dtype="<f4")
        basis = np.ascontiguousarray(basis, dtype="<f4")
        if mean.ndim != 1 or basis.shape != (mean.size, mean.size):
            raise ValueError(f"ChannelBasis.from_arrays expects mean[C] and basis[C, C]. Got {mean.shape} and {basis.shape}.")
        return cls(int(mean.size), mean.tobytes(), basis.tobytes())

    @property
    def mean_array(self) -> np.ndarray:
        """float32 array[C] (read-only)."""
        return np.frombuffer(self.mean, "<f4").astype(np.float32, copy=False)

    @property
    def basis_array(self) -> np.ndarray:
        """float32 array[C, C] (read-only); column j is component j."""
        return np.frombuffer(self.basis, "<f4").astype(np.float32, copy=False).reshape(self.channels, self.channels)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "channel_pca",
            "channels": self.channels,
            "dtype": "<f4",
            "mean": base64.b64encode(self.mean).decode("ascii"),
            "basis": base64.b64encode(self.basis).decode("ascii"),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ChannelBasis":
        expected = {"kind", "channels", "dtype", "mean", "basis"}
        if not isinstance(data, dict) or set(data) != expected or data["kind"] != "channel_pca" or data["dtype"] != "<f4":
            raise ValueError(
                f"ChannelBasis.from_dict(data=) expects keys {sorted(expected)} with kind 'channel_pca' and dtype '<f4'. "
                f"Got {sorted(data) if isinstance(data, dict) else type(data).__name__}."
            )
        try:
            mean, basis = base64.b64decode(data["mean"], validate=True), base64.b64decode(data["basis"], validate=True)
        except (TypeError, ValueError) as error:
            raise ValueError(f"ChannelBasis.from_dict(data=) expects base64 mean and basis. Got unreadable text: {error}.") from None
        return cls(int(data["channels"]), mean, basis)


def fit_channel_basis(samples) -> ChannelBasis:
    """Principal axes of the channels of some views of one target: a `ChannelBasis`.

    Args:
        samples: float arrays[C, H, W] (one per view, the same C), e.g. a store's first views.
    Returns:
        The channel means and the eigenvectors of the channel covariance (float64, pooled
        over every point of every sample), by decreasing eigenvalue, each signed so that
        its largest-magnitude entry is positive (the same samples give the same bytes).
    """
    arrays = [np.asarray(x, dtype=np.float64) for x in samples]
    if not arrays or any(a.ndim != 3 or a.shape[0] != arrays[0].shape[0] for a in arrays):
        raise ValueError(f"fit_channel_basis(samples=) expects one or more arrays[C, H, W] of one C. Got shapes {[a.shape for a in arrays]}.")
    if not all(np.isfinite(a).all() for a in arrays):
        raise ValueError("fit_channel_basis(samples=) expects finite values. Got NaN or inf.")
    channels = arrays[0].shape[0]
    flat = np.concatenate([a.reshape(channels, -1) for a in arrays], axis=1)
    mean = flat.mean(axis=1)
    centred = flat - mean[:, None]
    values, vectors = np.linalg.eigh(centred @ centred.T / flat.shape[1])
    vectors = vectors[:, np.argsort(values)[::-1]]
    signs = np.sign(vectors[np.abs(vectors).argmax(axis=0), np.arange(channels)])
    vectors = vectors * np.where(signs == 0, 1.0, signs)
    # Re-orthonormalise in float32 so that the stored basis passes its own check.
    q, r = np.linalg.qr(vectors.astype(np.float32).astype(np.float64))
    q = q * np.sign(np.diag(r))
    return ChannelBasis.from_arrays(mean, q)


@dataclass(frozen=True, slots=True)
class TargetCodec:
    """The storage and compression of one target; parsed from and printed as its name."""

    storage: str
    """``"fp32"``, ``"fp16"``, ``"int"`` (b-bit codes in uint8 with scale and offset) or ``"pca"`` (coefficient codes)."""
    bits: int
    """Bits per stored value: 32, 16 (fp16, and the codes of ``pca-std<k>-dct``), 8 (``pca-std<k>``), or 2..8 for integer codes."""
    scaling: str
    """``"none"`` for floats; ``"channel"``, ``"view"`` or ``"std"`` for integer codes; ``"pca"`` for ``pca`` storage."""
    steps_per_std: int
    """k of ``int<b>-std<k>`` (quantization step = std(view) / k) or ``pca-std<k>`` (step = rms(view) / k); 0 otherwise."""
    compressor: str
    """``"none"``, ``"zstd"``, ``"blosc-shuffle"`` or ``"blosc-bitshuffle"``."""
    level: int
    """Compression level of the compressor (0 when there is none)."""
    predict: str = ""
    """Axes the integer codes are differenced along before compression (``"chw"``, ``"bhw"``, ``"hw"``, ...); ``""`` for none."""
    floor: float | None = None
    """Values below it are raised to it before quantization (``-floor<X>``); None for no floor."""
    spatial: str = ""
    """``"dct"``: ``pca`` coefficients also transformed along the map (``pca-std<k>-dct``); ``""`` otherwise."""
    basis: ChannelBasis | None = dataclasses.field(default=None, compare=False, repr=False)
    """The store's basis of this target (``pca`` storage only, `with_basis`); not part of the name."""

    def __post_init__(self) -> None:
        # Everything is validated through the name grammar, so no invalid codec can exist.
        if parse_codec(self.name) != self:
            raise ValueError(f"TargetCodec expects fields that form a valid codec name. Got {self!r}.")

    # ---- naming -------------------------------------------------------------------

    def with_basis(self, basis: ChannelBasis | None) -> "TargetCodec":
        """This codec bound to a store's basis (``pca`` storage; the same codec for the others)."""
        if self.storage != "pca":
            return self
        if basis is not None and not isinstance(basis, ChannelBasis):
            raise ValueError(f"TargetCodec.with_basis(basis=) expects a ChannelBasis or None. Got {type(basis).__name__}.")
        return dataclasses.replace(self, basis=basis)

    @property
    def needs_basis(self) -> bool:
        """Whether encoding and decoding need a store's `ChannelBasis` (``pca`` storage)."""
        return self.storage == "pca"

    @property
    def storage_name(self) -> str:
        if self.storage == "pca":
            return f"pca-std{self.steps_per_std}" + (f"-{self.spatial}" if self.spatial else "")
        if self.storage != "int":
            return self.storage
        suffix = f"std{self.steps_per_std}" if self.scaling == "std" else self.scaling
        name = f"int{self.bits}-{suffix}" + (f"-d{self.predict}" if self.predict else "")
        return name + (f"-floor{self.floor:.4f}".rstrip("0").rstrip(".") if self.floor is not None else "")

    @property
    def compressor_name(self) -> str:
        if self.compressor == "none":
            return ""
        if self.compressor == "zstd":
            return f"zstd{self.level}"
        return f"blosc-zstd{self.level}-{self.compressor.removeprefix('blosc-')}"

    @property
    def name(self) -> str:
        """Canonical name, e.g. ``"int8-channel+zstd5"``."""
        return self.storage_name + (f"+{self.compressor_name}" if self.compressor != "none" else "")

    def to_dict(self) -> dict[str, Any]:
        """``{"name": ..., "configuration": {...}}`` in the style of zarr's codec metadata."""
        configuration = {
            "storage": self.storage,
            "bits": self.bits,
            "scaling": self.scaling,
            "steps_per_std": self.steps_per_std,
            "compressor": self.compressor,
            "level": self.level,
        }
        if self.predict:  # absent without prediction, so stores written before it read unchanged
            configuration["predict"] = self.predict
        if self.floor is not None:  # absent without a floor, for the same reason
            configuration["floor"] = self.floor
        if self.spatial:  # absent without a spatial transform, for the same reason
            configuration["spatial"] = self.spatial
        return {"name": self.name, "configuration": configuration}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TargetCodec":
        if not isinstance(data, dict) or "name" not in data:
            raise ValueError(f"TargetCodec.from_dict(data=) expects a dict with a 'name'. Got {data!r}.")
        codec = parse_codec(data["name"])
        config = data.get("configuration")
        if config is not None and config != codec.to_dict()["configuration"]:
            raise ValueError(
                f"TargetCodec.from_dict(data=) expects a configuration that matches the name {codec.name!r}. "
                f"Got {config!r}."
            )
        return codec

    # ---- storage ----------------------------------------------------------------

    @property
    def dtype(self) -> np.dtype:
        """numpy dtype of the stored values."""
        if self.quantized:  # int and pca codes: 8 bits, or 16 for pca-std<k>-dct
            return np.dtype(np.uint8 if self.bits <= 8 else np.uint16)
        return np.dtype({"fp32": np.float32, "fp16": np.float16}[self.storage])

    @property
    def _signed_dtype(self) -> np.dtype:
        """The signed integers that `dtype`'s codes zigzag-map (``pca`` coefficients)."""
        return np.dtype(f"i{self.dtype.itemsize}")

    @property
    def quantized(self) -> bool:
        """Whether one view stores codes with (scale, offset) parameters (integer and ``pca`` storage)."""
        return self.storage in ("int", "pca")

    def num_params(self, channels: int) -> int:
        """Pc: how many (scale, offset) pairs one view stores for a target of C channels
        (``pca``: one, the coefficient step and an offset of 0)."""
        if not self.quantized:
            return 0
        return 1 if self.scaling in ("view", "pca") else channels

    def _bound_basis(self, channels: int, where: str) -> ChannelBasis:
        if self.basis is None:
            raise ValueError(
                f"TargetCodec({self.name!r}).{where} expects the store's channel basis. Got none: fit one with "
                f"label_store.fit_target_bases (or fit_channel_basis) and pass the target's spec with its transform."
            )
        if self.basis.channels != channels:
            raise ValueError(f"TargetCodec({self.name!r}).{where} expects {self.basis.channels} channels (its basis). Got {channels}.")
        return self.basis

    def _encode_pca(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        basis = self._bound_basis(x.shape[0], "encode")
        flat = x.reshape(x.shape[0], -1)
        coefficients = basis.basis_array.T @ (flat - basis.mean_array[:, None])
        if self.spatial:
            coefficients = _dct_2d(coefficients.reshape(x.shape)).reshape(flat.shape)
        rms = float(np.sqrt(np.mean(np.square(flat, dtype=np.float64)))) if flat.size else 0.0
        peak = float(np.abs(coefficients).max()) if coefficients.size else 0.0
        code_peak = DCT_CODE_PEAK if self.spatial else PCA_CODE_PEAK
        step = np.float32(max(rms / self.steps_per_std, peak / code_peak))
        if step > 0:
            coefficients *= np.float32(1.0) / step
        np.rint(coefficients, out=coefficients)
        np.clip(coefficients, -code_peak, code_peak, out=coefficients)
        codes = _zigzag(coefficients.astype(self._signed_dtype)).reshape(x.shape)
        return codes, np.array([step], np.float32), np.zeros(1, np.float32)

    def _decode_pca(self, codes: np.ndarray, scale: np.ndarray) -> np.ndarray:
        basis = self._bound_basis(codes.shape[0], "decode")
        raw = np.asarray(codes, self.dtype).reshape(codes.shape[0], -1)
        coefficients = _unzigzag(raw).view(self._signed_dtype).astype(np.float32) * np.float32(scale.reshape(-1)[0])
        if self.spatial:
            coefficients = _dct_2d(coefficients.reshape(codes.shape), inverse=True).reshape(coefficients.shape)
        out = basis.basis_array @ coefficients
        out += basis.mean_array[:, None]
        return out.reshape(codes.shape)

    def encode(
        self, x: np.ndarray, keep: np.ndarray | None = None, layout: str = "points"
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Quantize one view's target.

        Args:
            x: float32 array[C, H, W], finite.
            keep: None, or bool array[H, W]: the points to store (region storage,
                `label_store.schema.StoreRegion`), in the region layout (`stored_codes`).
                Scale and offset are those of the whole map, so kept points code as without it.
            layout: the region layout's order, one of `REGION_LAYOUTS` (with ``keep``).
        Returns:
            ``(codes, scale, offset)``: codes array[C, H, W] of `dtype`; scale and offset
            float32 array[Pc] (empty for float storage).
        """
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 3:
            raise ValueError(f"TargetCodec.encode(x=) expects an array[C, H, W]. Got shape {x.shape}.")
        if keep is not None and np.shape(keep) != x.shape[1:]:
            raise ValueError(f"TargetCodec.encode(keep=) expects a bool array[H, W] of shape {x.shape[1:]}. Got {np.shape(keep)}.")
        empty = np.zeros(0, np.float32)
        if self.storage == "pca":
            if keep is not None:
                raise ValueError(f"TargetCodec({self.name!r}).encode(keep=) expects None: transform-coded targets are stored dense.")
            return self._encode_pca(x)
        if self.storage == "fp32":
            return (x if keep is None else _region_order(_pack(x, keep), keep, layout)), empty, empty
        if self.storage == "fp16":
            peak = float(np.abs(x).max()) if x.size else 0.0
            if peak > FLOAT16_MAX:
                raise ValueError(
                    f"TargetCodec({self.name!r}).encode(x=) expects |values| <= {FLOAT16_MAX}. Got {peak}; "
                    f"use an fp32 or int codec for this target."
                )
            half = x.astype(np.float16)
            return (half if keep is None else _region_order(_pack(half, keep), keep, layout)), empty, empty
        if self.floor is not None:
            x = np.maximum(x, np.float32(self.floor))
        levels = (1 << self.bits) - 1
        channels = x.shape[0]
        flat = x.reshape(channels, -1)
        if self.scaling == "view":
            lo = np.array([flat.min()], np.float32)
            hi = np.array([flat.max()], np.float32)
            span = (hi.astype(np.float64) - lo) / levels
        else:
            lo = flat.min(axis=1)
            hi = flat.max(axis=1)
            span = (hi.astype(np.float64) - lo) / levels
            if self.scaling == "std":
                step = float(flat.std(dtype=np.float64)) / self.steps_per_std
                span = np.maximum(span, step)
        scale = span.astype(np.float32)
        offset = lo.astype(np.float32)
        inverse = np.divide(1.0, scale, out=np.zeros_like(scale), where=scale > 0)
        shape = (-1, 1) if scale.size > 1 else (1, 1)
        codes = (flat - offset.reshape(shape)) * inverse.reshape(shape)
        np.rint(codes, out=codes)
        np.clip(codes, 0, levels, out=codes)
        codes = codes.astype(np.uint8).reshape(x.shape)
        return self.stored_codes(codes, keep, layout), scale, offset

    def stored_codes(self, codes: np.ndarray, keep: np.ndarray | None = None, layout: str = "points") -> np.ndarray:
        """Plain quantization codes -> the values this codec stores (the `predict` residuals, if any).

        ``keep`` (bool array[H, W], see `encode`) selects the region layout: the codes of the
        ``n = keep.sum()`` kept points, in row-major order, are predicted along the bins
        (``b``/``c``) and along that sequence of points (``w``; ``h`` has no meaning there),
        then stored first and zeros after (the array keeps its shape, so chunks stay fixed,
        and entropy coding removes the zeros). ``layout`` orders those ``C * n`` values:
        ``points`` puts each point's C residuals together, ``channels`` (schema 3 stores)
        each channel's n. On box targets the region layout stores a quarter-of-the-points
        region in about a third of the dense bytes, ``points`` 5% below ``channels``
        (benchmarks/RESULTS.md, "Box targets where LD reads them").
        """
        if keep is None:
            return self._predict(codes) if self.predict else codes
        packed = _pack(codes, keep)
        if self.predict:
            flat = packed.reshape(packed.shape[0], 1, -1)
            packed = self._predict(flat, _sequence_axes(self.predict)).reshape(codes.shape)
        return _region_order(packed, keep, layout)

    def _axes(self, codes: np.ndarray, predict: str) -> tuple[np.ndarray, list[int]]:
        """``codes`` viewed so that every axis of ``predict`` is one numpy axis, and those axes."""
        if "b" not in predict:
            return codes, [_AXES[a] for a in predict]
        channels = codes.shape[0]
        if channels % EDGE_GROUPS:
            raise ValueError(
                f"TargetCodec({self.name!r}) expects a channel count divisible by {EDGE_GROUPS} for its 'b' "
                f"prediction (the bins of 4 box edges). Got {channels} channels; use 'c' instead."
            )
        grouped = codes.reshape(EDGE_GROUPS, channels // EDGE_GROUPS, *codes.shape[1:])
        return grouped, [{"b": 1, "h": 2, "w": 3}[a] for a in predict]

    def _predict(self, codes: np.ndarray, predict: str | None = None) -> np.ndarray:
        """Codes -> zigzag-mapped residuals of differencing along ``predict``'s axes (default `predict`; mod 256)."""
        residual, axes = self._axes(codes, self.predict if predict is None else predict)
        for axis in axes:
            residual = np.diff(residual, axis=axis, prepend=np.uint8(0))  # uint8: wraps mod 256
        return _zigzag(residual.reshape(codes.shape).view(np.int8))

    def _unpredict(self, residual: np.ndarray, predict: str | None = None) -> np.ndarray:
        """Inverse of `_predict`: zigzag-mapped residuals -> codes."""
        residual = np.asarray(residual, np.uint8)
        codes = _unzigzag(residual)  # a new, writable array
        grouped, axes = self._axes(codes, self.predict if predict is None else predict)  # a view of codes
        for axis in reversed(axes):
            # Running sum in place, one slice at a time (uint8 wraps mod 256): 1.6x faster
            # than np.cumsum on these short axes.
            running = np.moveaxis(grouped, axis, 0)
            for i in range(1, running.shape[0]):
                running[i] += running[i - 1]
        return codes

    def decode(
        self, codes: np.ndarray, scale: np.ndarray, offset: np.ndarray, keep: np.ndarray | None = None, layout: str = "points"
    ) -> np.ndarray:
        """Inverse of `encode`: float32 array[C, H, W]; with ``keep`` (the region layout, in
        ``layout``'s order) NaN at the points outside it, which no stored target can be."""
        if self.storage == "pca":
            if keep is not None:
                raise ValueError(f"TargetCodec({self.name!r}).decode(keep=) expects None: transform-coded targets are stored dense.")
            return self._decode_pca(codes, scale)
        if keep is not None:
            return self._decode_region(codes, scale, offset, np.asarray(keep, dtype=bool), layout)
        if not self.quantized:
            return codes.astype(np.float32)
        if self.predict:
            codes = self._unpredict(codes)
        out = np.empty(codes.shape, np.float32)
        shape = (-1, 1) if scale.size > 1 else (1, 1)
        flat = out.reshape(out.shape[0], -1)
        # one pass to multiply (uint8 promotes to float32), one to add
        np.multiply(codes.reshape(codes.shape[0], -1), scale.reshape(shape), out=flat)
        flat += offset.reshape(shape)
        return out

    def _decode_region(self, codes: np.ndarray, scale: np.ndarray, offset: np.ndarray, keep: np.ndarray, layout: str) -> np.ndarray:
        channels = codes.shape[0]
        if keep.shape != codes.shape[1:]:
            raise ValueError(f"TargetCodec.decode(keep=) expects a bool array[H, W] of shape {codes.shape[1:]}. Got {keep.shape}.")
        count = int(keep.sum())
        values = _region_values(np.asarray(codes), count, layout)
        if self.quantized and self.predict:
            values = self._unpredict(values.reshape(channels, 1, count), _sequence_axes(self.predict))[:, 0]
        out = np.full(codes.shape, np.nan, np.float32)
        if self.quantized:
            column = (-1, 1) if scale.size > 1 else (1, 1)
            values = values.astype(np.float32) * scale.reshape(column) + offset.reshape(column)
        out[:, keep] = values
        return out

    def error_bound(self, x: np.ndarray, scale: np.ndarray) -> np.ndarray:
        """The stated elementwise bound on ``|x - decode(encode(x))|``: array[C, H, W]."""
        x = np.asarray(x, np.float32)
        eps32 = np.float32(2.0**-23)
        if self.storage == "fp32":
            return np.zeros_like(x)
        if self.storage == "fp16":
            # Half an fp16 ulp (relative 2**-11) or half the subnormal spacing 2**-24.
            return np.maximum(np.abs(x) * 2.0**-11, 2.0**-25).astype(np.float32)
        if self.storage == "pca":
            vectors = self._bound_basis(x.shape[0], "error_bound").basis_array
            step = float(np.asarray(scale).reshape(-1)[0])
            spread = np.abs(vectors).sum(axis=1).reshape(-1, 1, 1) * step
            mean = np.abs(self.basis.mean_array).reshape(-1, 1, 1)
            terms, code_peak = x.shape[0], PCA_CODE_PEAK
            if self.spatial:
                # A coefficient's rounding reaches point (i, w) through |D_H[:, i]| and |D_W[:, w]|.
                rows = np.abs(dct_matrix(x.shape[1])).sum(axis=0).reshape(1, -1, 1)
                columns = np.abs(dct_matrix(x.shape[2])).sum(axis=0).reshape(1, 1, -1)
                spread = spread * rows * columns
                terms, code_peak = x.shape[0] + x.shape[1] + x.shape[2], DCT_CODE_PEAK
            rounding = (np.abs(x) + mean + spread * code_peak) * 8 * terms * eps32  # float32 matmuls
            return (spread / 2 * (1 + 1e-5) + rounding).astype(np.float32)
        per_channel = np.broadcast_to(scale.reshape(-1, 1, 1), (x.shape[0], 1, 1))
        bound = per_channel / 2 * (1 + 1e-5) + (np.abs(x) + per_channel * ((1 << self.bits) - 1)) * 4 * eps32
        if self.floor is not None:
            bound = bound + np.maximum(np.float32(self.floor) - x, 0)
        return bound.astype(np.float32)

    # ---- compression ------------------------------------------------------------

    def zarr_compressors(self) -> list:
        """zarr v3 bytes-to-bytes codecs for one inner chunk: the compressor, then crc32c."""
        from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

        chain: list = []
        if self.compressor == "zstd":
            chain.append(ZstdCodec(level=self.level, checksum=False))
        elif self.compressor.startswith("blosc-"):
            shuffle = self.compressor.removeprefix("blosc-")
            chain.append(BloscCodec(cname="zstd", clevel=self.level, shuffle=shuffle, typesize=self.dtype.itemsize, blocksize=0))
        chain.append(Crc32cCodec())
        return chain

    def numcodecs_compressor(self):
        """The numcodecs codec that zarr's compressor wraps (None without compression)."""
        from numcodecs import Blosc, Zstd

        if self.compressor == "zstd":
            return Zstd(level=self.level)
        if self.compressor.startswith("blosc-"):
            shuffle = Blosc.SHUFFLE if self.compressor == "blosc-shuffle" else Blosc.BITSHUFFLE
            return Blosc.from_config(
                {"cname": "zstd", "clevel": self.level, "shuffle": shuffle, "blocksize": 0, "typesize": self.dtype.itemsize}
            )
        return None

    def compressed_nbytes(self, codes: np.ndarray) -> int:
        """Bytes one chunk of these codes takes in a store (compressed, plus the crc32c)."""
        compressor = self.numcodecs_compressor()
        raw = np.ascontiguousarray(codes)
        size = raw.nbytes if compressor is None else len(compressor.encode(raw))
        return size + 4


def _zigzag(signed: np.ndarray) -> np.ndarray:
    """Signed integers -> unsigned ones of the same width: 0, -1, 1, -2, ... -> 0, 1, 2, 3, ..."""
    width = signed.dtype.itemsize
    return ((signed << 1) ^ (signed >> (8 * width - 1))).view(f"u{width}")


def _unzigzag(raw: np.ndarray) -> np.ndarray:
    """Inverse of `_zigzag`, in the unsigned dtype (view it signed where the sign matters); a new array."""
    one = raw.dtype.type(1)
    return (raw >> one) ^ (raw.dtype.type(0) - (raw & one))


def _dct_2d(planes: np.ndarray, inverse: bool = False) -> np.ndarray:
    """Orthonormal 2-D DCT-II of each plane of array[C, H, W] (``inverse``: its transpose), float32."""
    rows, columns = dct_matrix(planes.shape[1]), dct_matrix(planes.shape[2])
    if inverse:
        return rows.T @ planes.astype(np.float32, copy=False) @ columns
    return rows @ planes.astype(np.float32, copy=False) @ columns.T


def _pack(values: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """The region layout of `TargetCodec.stored_codes`: kept points first (row-major), zeros after; same shape."""
    keep = np.asarray(keep, dtype=bool)
    if keep.shape != values.shape[1:]:
        raise ValueError(f"TargetCodec(keep=) expects a bool array[H, W] of shape {values.shape[1:]}. Got {keep.shape}.")
    out = np.zeros(values.shape, values.dtype)
    flat = out.reshape(values.shape[0], -1)
    flat[:, : int(keep.sum())] = values[:, keep]
    return out


def _region_order(packed: np.ndarray, keep: np.ndarray, layout: str) -> np.ndarray:
    """A region target's ``C * n`` leading values (array[C, H, W], each channel's n first) in
    ``layout``'s order, zeros after; same shape."""
    if layout not in REGION_LAYOUTS:
        raise ValueError(f"TargetCodec(layout=) expects one of {REGION_LAYOUTS}. Got {layout!r}.")
    if layout == "channels":
        return packed
    channels, count = packed.shape[0], int(np.count_nonzero(keep))
    out = np.zeros_like(packed)
    out.reshape(-1)[: channels * count] = packed.reshape(channels, -1)[:, :count].T.reshape(-1)
    return out


def _region_values(stored: np.ndarray, count: int, layout: str) -> np.ndarray:
    """Inverse of `_region_order`: the ``count`` kept points' stored values, array[C, count]."""
    if layout not in REGION_LAYOUTS:
        raise ValueError(f"TargetCodec(layout=) expects one of {REGION_LAYOUTS}. Got {layout!r}.")
    channels = stored.shape[0]
    if layout == "channels":
        return stored.reshape(channels, -1)[:, :count]
    return stored.reshape(-1)[: channels * count].reshape(count, channels).T


def _sequence_axes(predict: str) -> str:
    """Prediction axes in the region layout: the bins (``b``/``c``) and the point sequence (``w``)."""
    axes = predict.replace("h", "")
    return axes if "w" in axes or "h" not in predict else axes + "w"


def parse_codec(name: str) -> TargetCodec:
    """Parse a codec name such as ``"int8-channel+zstd5"`` (see the module docstring)."""
    if isinstance(name, str) and name in _PARSED:
        return _PARSED[name]
    codec = _parse_codec(name)
    if len(_PARSED) < 1024:
        _PARSED[name] = codec
    return codec


_PARSED: dict[str, TargetCodec] = {}


def _parse_codec(name: str) -> TargetCodec:
    if not isinstance(name, str):
        raise ValueError(f"parse_codec(name=) expects a codec name string. Got {type(name).__name__} {name!r}.")
    storage_text, plus, compressor_text = name.partition("+")
    storage = _STORAGE_RE.match(storage_text)
    compressor = _COMPRESSOR_RE.match(compressor_text) if compressor_text else None
    if storage is None or (plus and compressor is None):
        raise ValueError(
            "parse_codec(name=) expects '<storage>[+<compressor>]' with storage fp32, fp16, pca-std<k>[-dct], int<b>-channel, "
            "int<b>-view or int<b>-std<k> (b in 2..8), optionally followed by -d<axes> (axes from 'chw' in that "
            f"order, or 'b' in place of 'c') and -floor<X> (e.g. -floor-8), and compressor zstd<L>, blosc-zstd<L>-shuffle or blosc-zstd<L>-bitshuffle. Got {name!r}."
        )
    if storage.group("float"):
        kind, bits, scaling, k = storage.group("float"), 32 if storage.group("float") == "fp32" else 16, "none", 0
    elif storage.group("pk"):
        kind, bits, scaling, k = "pca", 16 if storage.group("dct") else 8, "pca", int(storage.group("pk"))
    else:
        kind, bits = "int", int(storage.group("bits"))
        k = int(storage.group("k")) if storage.group("k") else 0
        scaling = "std" if k else storage.group("scale")
    if compressor is None:
        comp, level = "none", 0
    elif compressor.group("zlevel") is not None:
        comp, level = "zstd", int(compressor.group("zlevel"))
        if not -7 <= level <= 22:
            raise ValueError(f"parse_codec(name=) expects a zstd level in -7..22. Got {level} in {name!r}.")
    else:
        comp, level = f"blosc-{compressor.group('shuffle')}", int(compressor.group("blevel"))
    codec = object.__new__(TargetCodec)
    for field_name, value in (
        ("storage", kind),
        ("bits", bits),
        ("scaling", scaling),
        ("steps_per_std", k),
        ("compressor", comp),
        ("level", level),
        ("predict", (storage.group("predict") or "") if kind == "int" else ""),
        ("floor", float(storage.group("floor")) if storage.group("floor") else None),
        ("spatial", "dct" if storage.group("dct") else ""),
        ("basis", None),
    ):
        object.__setattr__(codec, field_name, value)
    return codec


def profile_codec(name: str, profile: str) -> str:
    """The codec ``name`` under a codec profile (module docstring): its canonical name.

    ``small`` returns it unchanged; ``fast`` lowers a zstd level above `FAST_ZSTD_LEVEL`,
    or a blosc level above `FAST_BLOSC_LEVEL`, to that level (storage unchanged).
    """
    if profile not in CODEC_PROFILES:
        raise ValueError(f"profile_codec(profile=) expects one of {list(CODEC_PROFILES)}. Got {profile!r}.")
    codec = parse_codec(name)
    if profile == "small" or codec.compressor == "none":
        return codec.name
    fast = FAST_ZSTD_LEVEL if codec.compressor == "zstd" else FAST_BLOSC_LEVEL
    if codec.level <= fast:
        return codec.name
    return parse_codec(f"{codec.storage_name}+{codec.compressor_name.replace(f'zstd{codec.level}', f'zstd{fast}', 1)}").name
