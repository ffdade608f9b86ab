"""detcore.images: every image kind decodes to displayed uint8 RGB; every failure kind raises one error."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageFile

from detcore.images import ImageDecodeError, image_size, load_image


def _gradient(h: int = 12, w: int = 20) -> np.ndarray:
    """A non-symmetric RGB test pattern, so rotations and flips are distinguishable."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 10 % 256, y * 20 % 256, (x + 3 * y) % 256], axis=2).astype(np.uint8)


def _exif_jpeg(path, pixels: np.ndarray, orientation: int) -> None:
    image = Image.fromarray(pixels)
    exif = Image.Exif()
    exif[0x0112] = orientation
    image.save(path, format="JPEG", quality=100, subsampling=0, exif=exif.tobytes())


def test_rgb_png_is_exact(tmp_path):
    pixels = _gradient()
    Image.fromarray(pixels).save(tmp_path / "a.png")
    out = load_image(tmp_path / "a.png")
    assert out.dtype == np.uint8 and out.shape == (12, 20, 3)
    assert np.array_equal(out, pixels)
    assert image_size(tmp_path / "a.png") == (12, 20)


def test_grayscale_l_replicates_channels(tmp_path):
    gray = np.arange(12 * 20, dtype=np.uint8).reshape(12, 20)
    Image.fromarray(gray, mode="L").save(tmp_path / "g.png")
    out = load_image(tmp_path / "g.png")
    assert out.shape == (12, 20, 3)
    for c in range(3):
        assert np.array_equal(out[:, :, c], gray)


def test_one_bit(tmp_path):
    bits = np.zeros((8, 16), dtype=bool)
    bits[:, 8:] = True
    Image.fromarray(bits).convert("1").save(tmp_path / "b.png")
    assert Image.open(tmp_path / "b.png").mode == "1"
    out = load_image(tmp_path / "b.png")
    assert out.shape == (8, 16, 3)
    assert out[:, :8].max() == 0 and out[:, 8:].min() == 255


def test_rgba_composited_on_black(tmp_path):
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., :3] = (200, 100, 50)
    rgba[0, 0, 3] = 255  # opaque
    rgba[0, 1, 3] = 0  # transparent: black whatever the stored colour
    rgba[0, 2, 3] = 128  # half: (c * 128 + 127) // 255
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "a.png")
    out = load_image(tmp_path / "a.png")
    assert out.shape == (4, 4, 3)
    assert out[0, 0].tolist() == [200, 100, 50]
    assert out[0, 1].tolist() == [0, 0, 0]
    assert out[0, 2].tolist() == [(200 * 128 + 127) // 255, (100 * 128 + 127) // 255, (50 * 128 + 127) // 255]


def test_la_composited_on_black(tmp_path):
    la = np.zeros((4, 4, 2), dtype=np.uint8)
    la[..., 0] = 180
    la[..., 1] = 255
    la[1, 1, 1] = 0
    Image.fromarray(la, mode="LA").save(tmp_path / "la.png")
    out = load_image(tmp_path / "la.png")
    assert out[0, 0].tolist() == [180, 180, 180]
    assert out[1, 1].tolist() == [0, 0, 0]


def test_palette_and_palette_with_transparency(tmp_path):
    index = np.array([[0, 1], [2, 1]], dtype=np.uint8)
    palette = [255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 9)
    image = Image.fromarray(index, mode="P")
    image.putpalette(palette)
    image.save(tmp_path / "p.png")
    out = load_image(tmp_path / "p.png")
    assert out[0, 0].tolist() == [255, 0, 0] and out[0, 1].tolist() == [0, 255, 0] and out[1, 0].tolist() == [0, 0, 255]

    image.save(tmp_path / "pt.png", transparency=1)
    reopened = Image.open(tmp_path / "pt.png")
    assert reopened.mode == "P" and "transparency" in reopened.info
    out = load_image(tmp_path / "pt.png")
    assert out[0, 0].tolist() == [255, 0, 0]
    assert out[0, 1].tolist() == [0, 0, 0] and out[1, 1].tolist() == [0, 0, 0]  # index 1 is transparent


def test_palette_gif_with_transparency(tmp_path):
    index = np.array([[0, 1, 1]], dtype=np.uint8)
    image = Image.fromarray(index, mode="P")
    image.putpalette([10, 20, 30, 40, 50, 60] + [0] * (256 * 3 - 6))
    image.save(tmp_path / "t.gif", transparency=0)
    out = load_image(tmp_path / "t.gif")
    assert out.shape == (1, 3, 3)
    assert out[0, 0].tolist() == [0, 0, 0] and out[0, 1].tolist() == [40, 50, 60]


def test_sixteen_bit_takes_top_byte(tmp_path):
    values = np.array([[0, 255, 256, 40000], [65535, 1000, 30000, 512]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "d.png")
    assert Image.open(tmp_path / "d.png").mode in ("I;16", "I")
    out = load_image(tmp_path / "d.png")
    assert out.shape == (2, 4, 3)
    assert np.array_equal(out[:, :, 0], (values >> 8).astype(np.uint8))
    assert np.array_equal(out[:, :, 0], out[:, :, 2])


def test_sixteen_bit_tiff(tmp_path):
    values = np.array([[0, 65535], [32768, 511]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "d.tif")
    out = load_image(tmp_path / "d.tif")
    assert out[:, :, 1].tolist() == [[0, 255], [128, 1]]


def test_cmyk_jpeg(tmp_path):
    cmyk = Image.new("CMYK", (16, 8), (0, 255, 255, 0))  # pure red in CMYK
    cmyk.save(tmp_path / "c.jpg", quality=100)
    assert Image.open(tmp_path / "c.jpg").mode == "CMYK"
    out = load_image(tmp_path / "c.jpg")
    assert out.shape == (8, 16, 3)
    red = out.reshape(-1, 3).mean(axis=0)
    assert red[0] > 240 and red[1] < 15 and red[2] < 15


@pytest.mark.parametrize(
    "orientation, expected_shape, rotate",
    [
        (1, (12, 20, 3), lambda a: a),
        (3, (12, 20, 3), lambda a: a[::-1, ::-1]),
        (6, (20, 12, 3), lambda a: np.rot90(a, k=-1)),  # displayed rotated 90 degrees clockwise
        (8, (20, 12, 3), lambda a: np.rot90(a, k=1)),
    ],
)
def test_exif_orientation_applied(tmp_path, orientation, expected_shape, rotate):
    stored = np.zeros((12, 20, 3), dtype=np.uint8)
    stored[:4, :4] = (255, 255, 255)  # a white block in the stored top-left corner
    path = tmp_path / f"o{orientation}.jpg"
    _exif_jpeg(path, stored, orientation)
    out = load_image(path)
    assert out.shape == expected_shape
    assert image_size(path) == expected_shape[:2]
    expected = rotate(stored)
    assert np.abs(out.astype(int) - expected.astype(int)).max() < 40  # JPEG error only
    white = np.argwhere(out.mean(axis=2) > 200)
    corner = white.mean(axis=0)
    expected_corner = np.argwhere(expected.mean(axis=2) > 200).mean(axis=0)
    assert np.allclose(corner, expected_corner, atol=0.5)


def test_exif_orientation_6_specific_pixel(tmp_path):
    stored = np.zeros((10, 30, 3), dtype=np.uint8)
    stored[0:5, 0:5] = (250, 250, 250)  # stored top-left
    _exif_jpeg(tmp_path / "r.jpg", stored, 6)
    out = load_image(tmp_path / "r.jpg")
    assert out.shape == (30, 10, 3)
    # Orientation 6 displays the stored top-left at the top-right.
    assert out[2, 7].min() > 200 and out[2, 2].max() < 50


def _png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(_gradient(32, 32)).save(buffer, format="PNG")
    return buffer.getvalue()


def _jpeg_bytes() -> bytes:
    buffer = io.BytesIO()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _corrupt_png() -> bytes:
    data = bytearray(_png_bytes())
    start = data.index(b"IDAT") + 8
    for i in range(start, start + 20):
        data[i] ^= 0xFF
    return bytes(data)


def _random_header() -> bytes:
    data = bytearray(_png_bytes())
    data[:8] = b"\x00\x01\x02\x03\x04\x05\x06\x07"
    return bytes(data)


@pytest.mark.parametrize(
    "name, content, reason_part",
    [
        ("zero.png", b"", "zero-byte"),
        ("text.png", b"this is not an image\n" * 10, "UnidentifiedImageError"),
        ("header.png", _random_header(), "UnidentifiedImageError"),
        ("corrupt.png", _corrupt_png(), ""),
        ("trunc.png", _png_bytes()[: len(_png_bytes()) // 2], ""),
        ("trunc.jpg", _jpeg_bytes()[: len(_jpeg_bytes()) // 2], "truncated"),
    ],
)
def test_failures_raise_decode_error(tmp_path, name, content, reason_part):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ImageDecodeError) as caught:
        load_image(path, image_id=42)
    error = caught.value
    assert isinstance(error, ValueError)
    assert error.image_id == 42 and error.path == str(path)
    assert "image_id=42" in str(error) and str(path) in str(error)
    assert reason_part in error.reason
    assert len(error.reason) > 0


def test_missing_file(tmp_path):
    path = tmp_path / "nope.jpg"
    with pytest.raises(ImageDecodeError, match="file not found") as caught:
        load_image(path, image_id=7)
    assert "image_id=7" in str(caught.value) and "nope.jpg" in str(caught.value)
    with pytest.raises(ImageDecodeError):
        image_size(path, image_id=7)


def test_truncated_detected_even_if_global_flag_on(tmp_path):
    path = tmp_path / "t.jpg"
    path.write_bytes(_jpeg_bytes()[:600])
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = True
    try:
        with pytest.raises(ImageDecodeError):
            load_image(path, image_id=3)
        assert ImageFile.LOAD_TRUNCATED_IMAGES is True
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous


def test_error_pickles_with_attributes():
    import pickle

    error = pickle.loads(pickle.dumps(ImageDecodeError(5, "/x/y.png", "zero-byte file")))
    assert (error.image_id, error.path, error.reason) == (5, "/x/y.png", "zero-byte file")


def test_decode_image_bytes_matches_load_image(tmp_path):
    from detcore.images import decode_image_bytes

    _exif_jpeg(tmp_path / "r.jpg", _gradient(), 6)
    Image.fromarray(np.zeros((3, 5, 4), np.uint8), mode="RGBA").save(tmp_path / "a.png")
    for name in ("r.jpg", "a.png"):
        data = (tmp_path / name).read_bytes()
        assert np.array_equal(decode_image_bytes(data, image_id=1), load_image(tmp_path / name, image_id=1))
    assert decode_image_bytes((tmp_path / "r.jpg").read_bytes()).shape == (20, 12, 3)
    for bad, words in ((b"", "zero-byte"), (b"hello", "UnidentifiedImageError"), (_jpeg_bytes()[:700], "")):
        with pytest.raises(ImageDecodeError) as caught:
            decode_image_bytes(bad, image_id=9, name="<upload>")
        assert caught.value.image_id == 9 and caught.value.path == "<upload>" and words in caught.value.reason
