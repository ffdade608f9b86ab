"""Codec names, storage round trips within each codec's stated error, and compression."""

from __future__ import annotations

import numpy as np
import pytest

from label_store.codecs import TargetCodec, parse_codec
from label_store.schema import TargetSpec
from label_store.testing import synthetic_targets

ALL_CODECS = [
    "fp32",
    "fp16",
    "fp16+blosc-zstd5-shuffle",
    "int8-channel+zstd5",
    "int8-view",
    "int7-channel+blosc-zstd5-bitshuffle",
    "int6-view+zstd3",
    "int5-view+zstd5",
    "int4-channel+zstd5",
    "int2-view",
    "int8-std16+zstd5",
    "int8-std4+zstd5",
    "int6-std8",
    "int6-view-dchw+zstd15",
    "int5-view-dhw+zstd5",
    "int4-channel-dw",
    "int8-std8-dc+blosc-zstd5-bitshuffle",
    "int5-view-dchw-floor-4+zstd15",
    "int6-channel-floor2.5",
]


@pytest.mark.parametrize("name", ALL_CODECS)
def test_name_round_trip(name):
    codec = parse_codec(name)
    assert codec.name == name
    assert TargetCodec.from_dict(codec.to_dict()) == codec
    assert parse_codec(codec.name) is codec or parse_codec(codec.name) == codec


@pytest.mark.parametrize("bad", ["", "fp64", "int9-view", "int1-channel", "int8", "int8-chan", "int8-std0", "fp16+gzip", "int8-view+zstd99", "fp32+", 3,
     "int6-view-d", "int6-view-dhc", "int6-view-dx", "fp16-dhw", "int6-view-dchw-dc",
     "fp16-floor-2", "int6-view-floor", "int6-view-floor-2-dhw", "int6-view-floor-x"])
def test_bad_names_raise_with_grammar(bad):
    with pytest.raises(ValueError, match="expects"):
        parse_codec(bad)


def test_from_dict_rejects_inconsistent_configuration():
    data = parse_codec("int8-view+zstd5").to_dict()
    data["configuration"]["bits"] = 4
    with pytest.raises(ValueError, match="matches the name"):
        TargetCodec.from_dict(data)


def _samples():
    spec_cls = TargetSpec("cls/p3", (5, 12, 10), "fp32")
    spec_box = TargetSpec("box/p3", (4 * 8, 12, 10), "fp32")
    spec_fpn = TargetSpec("fpn/p3", (16, 12, 10), "fp32")
    out = synthetic_targets([spec_cls, spec_box, spec_fpn], seed=3)
    return list(out.values())


@pytest.mark.parametrize("name", ALL_CODECS)
def test_round_trip_within_stated_error(name):
    codec = parse_codec(name)
    for x in _samples():
        codes, scale, offset = codec.encode(x)
        assert codes.dtype == codec.dtype and codes.shape == x.shape
        assert scale.shape == offset.shape == (codec.num_params(x.shape[0]),)
        decoded = codec.decode(codes, scale, offset)
        assert decoded.dtype == np.float32 and decoded.shape == x.shape
        error = np.abs(decoded - x)
        bound = codec.error_bound(x, scale)
        assert np.all(error <= bound), f"{name}: max excess {(error - bound).max()}"
        if codec.quantized and not codec.predict:  # predicted codes are residuals: any byte
            assert codes.max() <= (1 << codec.bits) - 1
            # rounding to nearest: the worst error is close to half a step, not a whole one
            assert error.max() >= 0.25 * scale.min()


def test_fp32_is_exact_and_fp16_relative():
    x = _samples()[2]
    codes, _, _ = parse_codec("fp32").encode(x)
    assert np.array_equal(parse_codec("fp32").decode(codes, np.zeros(0), np.zeros(0)), x)
    half = parse_codec("fp16")
    decoded = half.decode(*half.encode(x))
    assert np.max(np.abs(decoded - x) / np.maximum(np.abs(x), 1e-3)) < 2**-10


def test_fp16_refuses_overflow():
    x = np.full((1, 2, 2), 7.0e4, np.float32)
    with pytest.raises(ValueError, match="65504"):
        parse_codec("fp16").encode(x)


def test_constant_channel_is_exact():
    x = np.zeros((3, 4, 4), np.float32)
    x[1] = -6.25
    x[2] = np.linspace(-1, 1, 16, dtype=np.float32).reshape(4, 4)
    for name in ("int8-channel", "int4-channel", "int8-std8"):
        codec = parse_codec(name)
        decoded = codec.decode(*codec.encode(x))
        assert np.array_equal(decoded[:2], x[:2]), name


def test_std_step_widens_when_range_needs_more_codes():
    x = np.zeros((1, 8, 8), np.float32)
    x[0, 0, 0] = 1000.0  # one outlier: std is small, range is huge
    codec = parse_codec("int4-std16")
    codes, scale, offset = codec.encode(x)
    assert scale[0] == pytest.approx(1000.0 / 15, rel=1e-6)
    assert codes.max() == 15
    assert np.abs(codec.decode(codes, scale, offset) - x).max() <= scale[0] / 2 * (1 + 1e-5)


def test_view_scaling_uses_one_pair_and_channel_scaling_one_per_channel():
    x = _samples()[0]
    _, scale_v, _ = parse_codec("int8-view").encode(x)
    _, scale_c, _ = parse_codec("int8-channel").encode(x)
    assert scale_v.shape == (1,) and scale_c.shape == (x.shape[0],)
    span = x.reshape(x.shape[0], -1)
    assert np.allclose(scale_c, (span.max(1) - span.min(1)) / 255, rtol=1e-6)


def test_compression_shrinks_and_bitshuffle_differs():
    x = synthetic_targets([TargetSpec("cls/p3", (8, 32, 32), "fp32")], seed=1)["cls/p3"]
    raw = parse_codec("int5-view")
    codes, _, _ = raw.encode(x)
    assert raw.compressed_nbytes(codes) == codes.nbytes + 4
    zstd = parse_codec("int5-view+zstd5").compressed_nbytes(codes)
    bitshuffle = parse_codec("int5-view+blosc-zstd5-bitshuffle").compressed_nbytes(codes)
    assert zstd < 0.75 * codes.nbytes
    assert bitshuffle < 0.9 * codes.nbytes and bitshuffle != zstd


def test_zarr_compressors_end_with_crc32c():
    from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

    chain = parse_codec("fp16+blosc-zstd5-shuffle").zarr_compressors()
    assert isinstance(chain[0], BloscCodec) and chain[0].typesize == 2 and isinstance(chain[-1], Crc32cCodec)
    chain = parse_codec("int8-view+zstd7").zarr_compressors()
    assert isinstance(chain[0], ZstdCodec) and chain[0].level == 7
    assert [type(c) for c in parse_codec("fp32").zarr_compressors()] == [Crc32cCodec]


@pytest.mark.parametrize("name", ["int6-view-dchw+zstd15", "int5-view-dhw+zstd5", "int4-channel-dw", "int8-std8-dc"])
def test_prediction_is_lossless_on_top_of_its_storage(name):
    codec = parse_codec(name)
    base = parse_codec(name.split("-d")[0] + ("+" + name.split("+")[1] if "+" in name else ""))
    assert codec.predict and not base.predict
    for x in _samples():
        codes, scale, offset = codec.encode(x)
        base_codes, base_scale, base_offset = base.encode(x)
        assert np.array_equal(scale, base_scale) and np.array_equal(offset, base_offset)
        assert np.array_equal(codec.decode(codes, scale, offset), base.decode(base_codes, base_scale, base_offset))
        # residuals are not the codes themselves (this sample has no constant axis)
        assert not np.array_equal(codes, base_codes)


def test_prediction_zigzag_and_wraparound():
    codec = parse_codec("int8-view-dw")
    # codes 0, 255, 0, 1 along w: differences 0, +255 (= -1 mod 256), -255 (= +1), +1
    x = np.array([[[0.0, 255.0, 0.0, 1.0]]], np.float32)
    codes, scale, offset = codec.encode(x)
    assert scale[0] == pytest.approx(1.0) and offset[0] == 0.0
    # zigzag: 0 -> 0, -1 -> 1, +1 -> 2
    assert codes.tolist() == [[[0, 1, 2, 2]]]
    assert np.array_equal(codec.decode(codes, scale, offset), x)
    constant = np.full((3, 4, 5), 2.5, np.float32)
    codes, scale, offset = parse_codec("int6-view-dchw").encode(constant)
    assert not codes.any() and np.array_equal(parse_codec("int6-view-dchw").decode(codes, scale, offset), constant)


def test_prediction_shrinks_smooth_box_distributions():
    # a box-edge distribution that moves smoothly over the map: bins and neighbours alike.
    # (On maps with independent per-point noise, prediction makes codes larger: the defaults
    # are chosen by measuring a real teacher's outputs, benchmarks/store_codecs.py.)
    bins, h, w = 17, 16, 16
    rows, cols = np.mgrid[0:h, 0:w]
    centre = 7 + 4 * np.sin(rows / 5.0) * np.cos(cols / 4.0)
    j = np.arange(bins).reshape(bins, 1, 1)
    x = np.concatenate([-0.5 * (j - centre - e) ** 2 for e in range(4)]).astype(np.float32)
    plain = parse_codec("int6-view+zstd5")
    predicted = parse_codec("int6-view-dchw+zstd5")
    plain_size = plain.compressed_nbytes(plain.encode(x)[0])
    predicted_size = predicted.compressed_nbytes(predicted.encode(x)[0])
    assert predicted_size < 0.9 * plain_size, (predicted_size, plain_size)


def test_configuration_without_prediction_is_unchanged():
    # stores written before prediction existed hold this exact configuration
    assert "predict" not in parse_codec("int5-view+zstd5").to_dict()["configuration"]
    assert parse_codec("int6-view-dchw+zstd15").to_dict()["configuration"]["predict"] == "chw"


def test_edge_prediction_restarts_at_each_box_edge():
    box = _samples()[1]  # 4 edges x 8 bins
    edge_wise, channel_wise = parse_codec("int6-view-dbhw+zstd15"), parse_codec("int6-view-dchw+zstd15")
    codes, scale, offset = edge_wise.encode(box)
    plain = parse_codec("int6-view").encode(box)[0]
    assert np.array_equal(edge_wise.decode(codes, scale, offset), parse_codec("int6-view").decode(plain, scale, offset))
    # each edge's first bin holds its own hw-differenced codes, not a difference from the
    # previous edge's last bin (which 'c' would give)
    spatial = parse_codec("int6-view-dhw").encode(box)[0]
    for first in range(0, 32, 8):
        assert np.array_equal(codes[first], spatial[first])
    assert not np.array_equal(codes, channel_wise.encode(box)[0])
    # the others are the same bin-to-bin differences as 'c'
    inner = [c for c in range(32) if c % 8]
    assert np.array_equal(codes[inner], channel_wise.encode(box)[0][inner])


def test_edge_prediction_needs_four_channel_groups():
    with pytest.raises(ValueError, match=r"divisible by 4.*5 channels"):
        parse_codec("int6-view-dbhw").encode(np.zeros((5, 3, 3), np.float32))


def test_edge_prediction_shrinks_box_distributions_more_than_channel_prediction():
    # each edge peaks at a different bin, so the last bin of one edge says nothing of the
    # next edge's first
    bins, h, w = 17, 16, 16
    rows, cols = np.mgrid[0:h, 0:w]
    j = np.arange(bins).reshape(bins, 1, 1)
    x = np.concatenate(
        [-0.5 * (j - (3 + 3 * e + 2 * np.sin(rows / 5.0 + e) * np.cos(cols / 4.0))) ** 2 for e in range(4)]
    ).astype(np.float32)
    sizes = {name: parse_codec(name).compressed_nbytes(parse_codec(name).encode(x)[0]) for name in ("int6-view-dchw+zstd15", "int6-view-dbhw+zstd15")}
    assert sizes["int6-view-dbhw+zstd15"] < sizes["int6-view-dchw+zstd15"], sizes


@pytest.mark.parametrize("bad", ["int6-view-dbchw", "int6-view-dcb", "int6-view-dhb", "int6-view-dbb"])
def test_edge_axis_takes_the_place_of_c(bad):
    with pytest.raises(ValueError, match="or 'b' in place of 'c'"):
        parse_codec(bad)


def test_floor_clamps_low_logits_and_shrinks_them():
    codec, plain = parse_codec("int5-view-dchw-floor-6+zstd15"), parse_codec("int5-view-dchw+zstd15")
    assert codec.floor == -6.0 and codec.to_dict()["configuration"]["floor"] == -6.0
    assert "floor" not in plain.to_dict()["configuration"]  # stores without a floor read unchanged
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((8, 24, 24)) * 1.5 - 9.0).astype(np.float32)  # mostly far below zero
    logits[:, 10:14, 10:14] = rng.uniform(-1, 3, (8, 4, 4))  # an object
    codes, scale, offset = codec.encode(logits)
    decoded = codec.decode(codes, scale, offset)
    assert float(offset[0]) == -6.0 and float(decoded.min()) == -6.0
    assert np.all(np.abs(decoded - logits) <= codec.error_bound(logits, scale))
    high = logits > -6.0 + float(scale[0])
    assert np.all(np.abs(decoded - logits)[high] <= scale[0] / 2 * (1 + 1e-4))
    plain_codes, plain_scale, _ = plain.encode(logits)
    assert scale[0] < plain_scale[0]  # a smaller range: a finer step for the values kept
    assert codec.compressed_nbytes(codes) < 0.7 * plain.compressed_nbytes(plain_codes)


def test_profile_codec_keeps_the_storage_and_lowers_the_level():
    from label_store.codecs import FAST_ZSTD_LEVEL, profile_codec

    assert profile_codec("int5-view-dchw+zstd15", "small") == "int5-view-dchw+zstd15"
    fast = parse_codec(profile_codec("int5-view-dchw-floor-8+zstd15", "fast"))
    assert (fast.storage_name, fast.compressor, fast.level) == ("int5-view-dchw-floor-8", "zstd", FAST_ZSTD_LEVEL)
    assert profile_codec("int6-view+blosc-zstd5-bitshuffle", "fast") == "int6-view+blosc-zstd1-bitshuffle"
    assert profile_codec("fp32", "fast") == "fp32" and profile_codec("int8-view+zstd1", "fast") == "int8-view+zstd1"
    with pytest.raises(ValueError, match="profile"):
        profile_codec("fp32", "tiny")
