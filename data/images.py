"""Opening images: the header check done when records are read, and the decode to 8-bit RGB.

``PIL``'s own ``convert("RGB")`` clips wide integer modes instead of scaling them (a 16-bit
grayscale PNG becomes almost all white) and drops alpha onto whatever colour the transparent
pixels hold. :func:`to_rgb` converts every mode PIL opens to the 8-bit RGB the image processor
expects, or refuses it with a :class:`ImageRefused` naming the mode:

- ``RGB``: as is; ``L``, ``1``, ``P``, ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``, ``RGBX``: PIL's conversion;
- ``I;16`` / ``I;16L`` / ``I;16B`` / ``I;16N`` (16-bit PNG, TIFF) and ``I`` (PIL's wide integer mode:
  16-bit PGM/PPM, 32-bit TIFF): values 0..65535 scaled to 0..255 (``v * 255 / 65535``, rounded); a
  value outside 0..65535 is refused;
- ``F`` (32-bit float): values in [0, 1] scaled to 0..255; anything else is refused (the range
  an 8-bit image means is unknown);
- alpha (``RGBA``, ``LA``, ``PA``, ``P`` or ``L``/``RGB`` with a transparency key): composited over
  white, as ``transformers``' own ``convert_to_rgb`` does.

:func:`check_header` is the cheap check (``Image.open`` reads the header only) that reading a
JSONL file and ``--dry-run`` do for every image: readable format, pixel count under
``data.max_image_pixels``, size equal to the record's ``width`` x ``height``. A file cut short
after its header is found when it is decoded (training, eval): see ``data.skip_invalid``.
"""

from __future__ import annotations

import warnings

import numpy as np
from PIL import Image

DEFAULT_MAX_IMAGE_PIXELS = 100_000_000  # data.max_image_pixels: 10k x 10k
WIDE_INT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "LA", "PA")


class ImageRefused(ValueError):
    """An image that cannot be used as it is (the message says why and what to do)."""


def _raise_pil_limit(max_pixels: int) -> None:
    # PIL refuses (DecompressionBombError) above 2 x MAX_IMAGE_PIXELS: keep that above our own limit so
    # data.max_image_pixels is the one limit a user meets.
    if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < max_pixels:
        Image.MAX_IMAGE_PIXELS = max_pixels


def open_image(path: str, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """``Image.open(path)`` (header only) with the pixel limit ``data.max_image_pixels``.

    Raises ``OSError`` (missing, unreadable, not an image) or :class:`ImageRefused` (over the limit).
    """
    _raise_pil_limit(max_pixels)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            im = Image.open(path)
        except Image.DecompressionBombError as exc:
            raise ImageRefused(f"{exc}; raise data.max_image_pixels to read it") from None
    pixels = im.width * im.height
    if pixels > max_pixels:
        im.close()
        raise ImageRefused(f"{im.width}x{im.height} = {pixels} pixels is over data.max_image_pixels ({max_pixels}); "
                           "raise data.max_image_pixels to read it, or downscale the image")
    return im


def check_header(path: str, width: int, height: int, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> None:
    """Open the header of ``path``: readable, under the pixel limit, ``width`` x ``height``. Raises
    ``OSError`` or :class:`ImageRefused` (the size mismatch as ``ImageRefused`` too, with both sizes)."""
    with open_image(path, max_pixels) as im:
        if im.size != (width, height):
            raise ImageRefused(f"record says {width}x{height} but {path} is {im.size[0]}x{im.size[1]}")


def to_rgb(im: Image.Image) -> Image.Image:
    """``im`` as 8-bit RGB (decodes it), by the rules in the module doc; :class:`ImageRefused` otherwise."""
    mode = im.mode
    if mode == "RGB":
        im.load()
        return im.copy()
    if mode in WIDE_INT_MODES or mode == "F":
        values = np.asarray(im, dtype=np.float64)
        lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
        top = 1.0 if mode == "F" else 65535.0
        if lo < 0 or hi > top or not np.isfinite(values).all():
            raise ImageRefused(f"mode {mode} with values in [{lo:g}, {hi:g}]: only 0..{top:g} is read as an image "
                               "(0 black, the top white); convert it to 8-bit first")
        gray = np.rint(values * (255.0 / top)).astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB")
    if mode in _ALPHA_MODES or "transparency" in im.info:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    try:
        return im.convert("RGB")
    except ValueError as exc:  # a mode PIL opens but cannot convert (e.g. premultiplied "La")
        raise ImageRefused(f"mode {mode} cannot be converted to RGB ({exc}); save the image as RGB") from None
