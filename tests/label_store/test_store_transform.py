"""Transform coding of FPN channels (``pca-std<k>``, ``pca-std<k>-dct``): the codec, its basis in the schema, a store written with it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from label_store import ChannelBasis, TargetSpec, create_store, default_target_specs, fit_channel_basis, fit_target_bases, open_store
from label_store.codecs import dct_matrix, parse_codec
from label_store.schema import canvas_targets

PCA = "pca-std4+blosc-zstd5-bitshuffle"
PCA_DCT = "pca-std4-dct+blosc-zstd5-bitshuffle"


def _correlated(seed: int, channels: int = 16, shape=(12, 10)) -> np.ndarray:
    """Channels mixed from a few smooth sources, as FPN channels are: array[C, H, W]."""
    rng = np.random.default_rng(seed)
    sources = rng.normal(size=(4, *shape)).cumsum(axis=1).cumsum(axis=2) / 5
    mix = np.random.default_rng(99).normal(size=(channels, 4))
    noise = rng.normal(scale=0.05, size=(channels, *shape))
    return (np.tensordot(mix, sources, axes=1) + noise + 1.5).astype(np.float32)


@pytest.mark.parametrize("name,dtype", [(PCA, np.uint8), (PCA_DCT, np.uint16)])
def test_round_trip_shape_dtype_and_stated_bound(name, dtype):
    basis = fit_channel_basis([_correlated(1), _correlated(2)])
    codec = parse_codec(name).with_basis(basis)
    assert codec.name == name and codec.needs_basis and codec.quantized and codec.num_params(16) == 1
    for seed in (3, 4):  # views the basis was not fitted on
        x = _correlated(seed)
        codes, scale, offset = codec.encode(x)
        assert codes.dtype == dtype and codes.shape == x.shape and scale.shape == offset.shape == (1,)
        decoded = codec.decode(codes, scale, offset)
        assert decoded.dtype == np.float32 and decoded.shape == x.shape
        error = np.abs(decoded - x)
        assert (error <= codec.error_bound(x, scale)).all()
        assert float(np.sqrt(np.mean(error**2))) < 0.2 * float(np.sqrt(np.mean(x**2)))
    # Finer steps, smaller error; the name (and its dict) does not carry the basis.
    fine = parse_codec(name.replace("std4", "std32")).with_basis(basis)
    x = _correlated(5)
    coarse_error = np.abs(codec.decode(*codec.encode(x)) - x).mean()
    assert np.abs(fine.decode(*fine.encode(x)) - x).mean() < coarse_error / 2
    assert parse_codec(name).to_dict() == codec.to_dict() and codec == parse_codec(name)


@pytest.mark.parametrize("name,scale", [("pca-std500", 40), ("pca-std500-dct", 4000)])
def test_large_coefficients_widen_the_step_instead_of_clipping(name, scale):
    basis = fit_channel_basis([_correlated(1)])
    codec = parse_codec(name).with_basis(basis)
    x = _correlated(2) * scale  # coefficients far beyond the codes' peak in steps of rms / 500
    codes, scale, offset = codec.encode(x)
    assert (np.abs(codec.decode(codes, scale, offset) - x) <= codec.error_bound(x, scale)).all()


def test_the_spatial_dct_stores_smooth_maps_in_fewer_bytes_at_the_same_squared_error():
    for n in (1, 2, 7, 32):
        matrix = dct_matrix(n).astype(np.float64)
        assert np.allclose(matrix @ matrix.T, np.eye(n), atol=1e-6)
    views = [_correlated(seed, shape=(24, 40)) for seed in range(5)]
    basis = fit_channel_basis(views[:3])
    sizes, errors = {}, {}
    for name in (PCA, PCA_DCT):
        codec = parse_codec(name).with_basis(basis)
        sizes[name] = sum(codec.compressed_nbytes(codec.encode(x)[0]) for x in views[3:])
        errors[name] = np.mean([np.mean((codec.decode(*codec.encode(x)) - x) ** 2) for x in views[3:]])
    # Both transforms are orthonormal: the same step gives about the same squared error,
    # and the smooth sources' planes gather into few DCT coefficients.
    assert sizes[PCA_DCT] < 0.8 * sizes[PCA]
    assert 0.5 < errors[PCA_DCT] / errors[PCA] < 2.0
    assert parse_codec(PCA_DCT).to_dict()["configuration"]["spatial"] == "dct"
    assert "spatial" not in parse_codec(PCA).to_dict()["configuration"]  # older stores' metadata unchanged


def test_basis_validation_and_errors():
    basis = fit_channel_basis([_correlated(1)])
    vectors = basis.basis_array
    assert np.allclose(vectors.T @ vectors, np.eye(16), atol=1e-5)
    assert ChannelBasis.from_dict(json.loads(json.dumps(basis.to_dict()))) == basis
    with pytest.raises(ValueError, match="orthonormal"):
        ChannelBasis.from_arrays(basis.mean_array, vectors * 2)
    with pytest.raises(ValueError, match="channel basis"):
        parse_codec(PCA).encode(_correlated(1))
    with pytest.raises(ValueError, match="expects 16 channels"):
        parse_codec(PCA).with_basis(basis).encode(_correlated(1, channels=8))
    with pytest.raises(ValueError, match="stored dense"):
        parse_codec(PCA).with_basis(basis).encode(_correlated(1), keep=np.ones((12, 10), bool))
    with pytest.raises(ValueError, match="only pca codecs"):
        TargetSpec("fpn/p3", (16, 12, 10), "int6-view-dhw+zstd15", basis)
    with pytest.raises(ValueError, match="pca-std<k>"):
        parse_codec("pca-std0")


def test_spec_transform_persists_and_old_specs_are_unchanged():
    old = TargetSpec("fpn/p3", (16, 12, 10), "int6-view-dhw+zstd15")
    assert old.to_dict() == {"name": "fpn/p3", "shape": [16, 12, 10], "codec": "int6-view-dhw+zstd15"}
    (fitted,) = fit_target_bases([TargetSpec("fpn/p3", (16, 12, 10), PCA)], [{"fpn/p3": _correlated(1)}])
    assert fitted.transform is not None and fitted.target_codec.basis == fitted.transform
    again = TargetSpec.from_dict(json.loads(json.dumps(fitted.to_dict())))
    assert again == fitted and again.target_codec.basis == fitted.transform
    (moved,) = canvas_targets([fitted], (48, 64))
    assert moved.transform == fitted.transform and moved.shape == (16, 6, 8)


@pytest.mark.parametrize("name", [PCA, PCA_DCT])
def test_a_store_written_with_it_reads_back_within_the_bound(tmp_path, fingerprint, make_record, name):
    from label_store.testing import synthetic_targets

    specs = default_target_specs(3, 7, fingerprint.canvas_hw, fingerprint.strides, 16, codecs={"fpn": name})
    views = [synthetic_targets(specs, seed=i) for i in range(4)]
    fitted = fit_target_bases(specs, views[:2])
    url = str(tmp_path / "pca.zarr")
    store = create_store(url, fingerprint, fitted, views_per_shard=2)
    with store.open_part("p") as part:
        for i, view in enumerate(views):
            part.append(make_record(i), view)
        part.commit()
    reader = open_store(url)
    assert [spec.transform for spec in reader.targets] == [spec.transform for spec in fitted]
    for i, view in enumerate(views):
        got = reader.read(i, 0)
        for spec in reader.targets:
            codec = spec.target_codec
            _, scale, _ = codec.encode(view[spec.name])
            assert got[spec.name].dtype == np.float32 and got[spec.name].shape == spec.shape
            assert (np.abs(got[spec.name] - view[spec.name]) <= codec.error_bound(view[spec.name], scale)).all(), spec.name
    # Reopening for writing with the same bases is the same store; another basis is not.
    create_store(url, fingerprint, fitted)
    refitted = fit_target_bases(specs, views[2:])
    with pytest.raises(ValueError, match="fpn/p3"):
        create_store(url, fingerprint, refitted)


def test_level_step_codecs_double_the_default_step_per_coarser_level():
    from label_store.schema import level_step_codecs

    specs = default_target_specs(3, 7, (64, 64), (8, 16, 32), 16, codecs={"fpn": "pca-std3-dct+blosc-zstd1-bitshuffle"})
    stepped = level_step_codecs(specs, ["fpn"])
    fpn = [spec.codec for spec in stepped if spec.group == "fpn"]
    assert fpn == ["pca-std3-dct+blosc-zstd1-bitshuffle", "pca-std6-dct+blosc-zstd1-bitshuffle", "pca-std12-dct+blosc-zstd1-bitshuffle"]
    assert [s for s in stepped if s.group != "fpn"] == [s for s in specs if s.group != "fpn"]
    assert level_step_codecs(specs, ["cls", "box"]) == specs  # fpn not named: left as it is
    int_specs = default_target_specs(3, 7, (64, 64), (8, 16, 32), 16)  # the basis-free int codec: no step to grow
    assert level_step_codecs(int_specs, ["fpn"]) == int_specs
