"""Image decoding that survives what real detection datasets hold.

`load_image` returns the *displayed* image as uint8 ``[H, W, 3]`` RGB: COCO-style
annotations are drawn on the image as a viewer shows it, so the EXIF orientation tag
(or the XMP ``tiff:Orientation`` Pillow reads in its place) is applied first.

Conversion policy, by Pillow mode (documented here because it decides the pixels the
teacher sees and the content hash recorded with every view):

- ``RGB``: unchanged. ``L``, ``1``, ``P``, ``CMYK``, ``YCbCr`` and other colour modes:
  Pillow's ``convert("RGB")`` (CMYK without ICC colour management; Adobe-inverted CMYK
  JPEGs are un-inverted by Pillow's decoder).
- Alpha (``RGBA``, ``LA``, ``PA``, ``RGBa``, ``La`` and any image with a ``transparency``
  key, e.g. a palette PNG with ``tRNS``): composited on **black**, exactly in integers,
  ``out = (c * a + 127) // 255``. Fully transparent pixels become black whatever colour
  the file stores under them (that colour is arbitrary and differs between encoders).
- 16-bit grayscale (``I;16``, ``I;16L``, ``I;16B``, ``I;16N``): ``v >> 8`` (the top
  byte, as OpenCV does). ``I`` (32-bit integer, what some Pillow plug-ins produce for
  16-bit data): clipped to ``[0, 65535]`` then ``>> 8``. ``F`` (float): clipped to
  ``[0, 255]`` and rounded.
- Multi-frame files (GIF, TIFF): the first frame.

Failures: a missing, zero-byte, non-image, corrupt or truncated file raises
`ImageDecodeError` naming the image id, the path and the reason, so that a batch job can
quarantine the image and go on. Truncation is detected because decoding is forced with
``Image.load()`` while Pillow's ``ImageFile.LOAD_TRUNCATED_IMAGES`` is False (if another
library has switched it on process-wide, it is switched off for the duration of our
decode, under a lock). A JPEG whose entropy-coded data is damaged but complete may decode
to garbage without an error: libjpeg only warns about that, and so does this module.
"""

from __future__ import annotations

import io
import threading
from pathlib import Path
from typing import Any, Callable

import numpy as np

_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_UINT16_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
_ROTATING_ORIENTATIONS = frozenset({5, 6, 7, 8})  # these swap height and width
_truncation_lock = threading.Lock()


class ImageDecodeError(ValueError):
    """An image file that cannot be decoded (missing, empty, not an image, corrupt, truncated).

    Attributes:
        image_id: the COCO image id, or None when the caller did not give one.
        path: the file that failed.
        reason: what went wrong, in words (the underlying exception type and message).
    """

    def __init__(self, image_id: int | None, path: str | Path, reason: str) -> None:
        self.image_id = image_id
        self.path = str(path)
        self.reason = reason
        super().__init__(f"Cannot decode image (image_id={image_id}, path={self.path}): {reason}")

    def __reduce__(self) -> tuple[Any, ...]:
        # Keeps the attributes when the error crosses a process boundary (Ray, multiprocessing).
        return (type(self), (self.image_id, self.path, self.reason))


def _describe(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _open(path: Path, image_id: int | None):
    """Open lazily (header only), turning every failure into `ImageDecodeError`."""
    from PIL import Image

    if not path.exists():
        raise ImageDecodeError(image_id, path, "file not found")
    if not path.is_file():
        raise ImageDecodeError(image_id, path, "not a regular file")
    if path.stat().st_size == 0:
        raise ImageDecodeError(image_id, path, "zero-byte file")
    try:
        return Image.open(path)
    except Exception as error:  # Pillow raises many types on bad headers; all mean "not decodable"
        raise ImageDecodeError(image_id, path, _describe(error)) from error


def _force_load(image) -> None:
    """``image.load()`` with truncated images treated as errors."""
    from PIL import ImageFile

    if not ImageFile.LOAD_TRUNCATED_IMAGES:
        image.load()
        return
    with _truncation_lock:
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        try:
            image.load()
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = True


def _composite_on_black(rgba: np.ndarray) -> np.ndarray:
    """uint8 ``[H, W, 4]`` -> ``[H, W, 3]``: ``(c * a + 127) // 255`` in integers."""
    alpha = rgba[:, :, 3:4].astype(np.uint16)
    return ((rgba[:, :, :3].astype(np.uint16) * alpha + 127) // 255).astype(np.uint8)


def _to_rgb_array(image) -> np.ndarray:
    """A loaded, oriented Pillow image -> uint8 ``[H, W, 3]`` (policy in the module docstring)."""
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return np.asarray(image, dtype=np.uint8)
    if mode in _UINT16_MODES or mode == "I":
        values = np.asarray(image).astype(np.int64)
        gray = (np.clip(values, 0, 65535) >> 8).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode == "F":
        gray = np.clip(np.rint(np.asarray(image, dtype=np.float64)), 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode in _ALPHA_MODES or "transparency" in image.info:
        return _composite_on_black(np.asarray(image.convert("RGBA"), dtype=np.uint8))
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def _decode(image, image_id: int | None, path: str | Path) -> np.ndarray:
    """Force-decode an opened image, orient it and convert it (policy in the module docstring)."""
    from PIL import ImageOps

    try:
        _force_load(image)
        oriented = ImageOps.exif_transpose(image)
        array = _to_rgb_array(oriented)
    except Exception as error:  # corrupt data surfaces as OSError, SyntaxError, zlib.error, ...
        raise ImageDecodeError(image_id, path, _describe(error)) from error
    if array.ndim != 3 or array.shape[2] != 3 or array.shape[0] == 0 or array.shape[1] == 0:
        raise ImageDecodeError(image_id, path, f"decoded to an unusable array of shape {array.shape}")
    return np.ascontiguousarray(array)


def load_image(path: str | Path, image_id: int | None = None) -> np.ndarray:
    """Decode one image file to its displayed pixels.

    Args:
        path: the image file.
        image_id: the COCO image id, only to name the image in errors.

    Returns:
        uint8 ``ndarray[H, W, 3]`` in RGB order, EXIF orientation applied, C-contiguous.

    Raises:
        ImageDecodeError: the file is missing, empty, not an image, corrupt or truncated.
    """
    path = Path(path)
    with _open(path, image_id) as image:
        return _decode(image, image_id, path)


def decode_image_bytes(
    data: bytes,
    image_id: int | None = None,
    name: str = "<bytes>",
    *,
    check_header: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """`load_image` for the bytes of an image file (e.g. an HTTP upload): same policy, same pixels.

    Args:
        data: the complete file content.
        image_id: the COCO image id, only to name the image in errors.
        name: what errors call the source in place of a path.
        check_header: called with the ``(height, width)`` stored in the file's header
            (before EXIF orientation) once the header is read and before any pixel is
            decoded; whatever it raises propagates, so a caller refuses a file that is
            too large, or not the size it expects, without decoding it.

    Raises:
        ImageDecodeError: the bytes are empty, not an image, corrupt or truncated (a
            ``PIL.Image.DecompressionBombWarning`` turned into an error is reported so too).
    """
    from PIL import Image

    if len(data) == 0:
        raise ImageDecodeError(image_id, name, "zero-byte file")
    try:
        image = Image.open(io.BytesIO(data))  # reads the header only
    except Exception as error:
        raise ImageDecodeError(image_id, name, _describe(error)) from error
    with image:
        if check_header is not None:
            width, height = image.size
            check_header(int(height), int(width))
        return _decode(image, image_id, name)


def image_size(path: str | Path, image_id: int | None = None) -> tuple[int, int]:
    """``(height, width)`` of the displayed (EXIF-oriented) image.

    Reads only the header where the format allows it (JPEG, most others); a PNG whose
    EXIF chunk may follow the pixel data is decoded to find it. A truncated file can
    pass here and still fail in `load_image`.

    Raises:
        ImageDecodeError: the file is missing, empty or not an image.
    """
    path = Path(path)
    with _open(path, image_id) as image:
        try:
            width, height = image.size
            orientation = image.getexif().get(0x0112, 1)
        except Exception as error:
            raise ImageDecodeError(image_id, path, _describe(error)) from error
    if orientation in _ROTATING_ORIENTATIONS:
        return (int(width), int(height))
    return (int(height), int(width))
