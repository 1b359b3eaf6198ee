"""Opening image files from datasets and users: every task's one opener, so that a corrupt or truncated file, or a
decompression bomb (a small PNG whose header claims 20000x20000 pixels), stops with one line naming the file and
the fix instead of a PIL traceback or gigabytes of allocation.

PIL refuses images over twice ``Image.MAX_IMAGE_PIXELS`` (about 179 M pixels by default) when it opens them;
:data:`MAX_PIXELS_ENV` raises that limit for trusted, huge images without code.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Iterator, Union

MAX_PIXELS_ENV = "VISADAPT_MAX_IMAGE_PIXELS"  # raises PIL's decompression-bomb limit for trusted, huge images


def _pixel_limit() -> Any:
    """PIL's ``Image.MAX_IMAGE_PIXELS``, or :data:`MAX_PIXELS_ENV` (a count, or ``none`` for no limit) when set."""
    from PIL import Image

    value = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if not value:
        return Image.MAX_IMAGE_PIXELS
    if value.lower() == "none":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{MAX_PIXELS_ENV}={value!r}: pass a pixel count (e.g. 400000000) or none.") from None


def _claimed_size(path: Path) -> str:
    """``W×H`` from the header of an image PIL refused as too large (opening reads the header, not the pixels)."""
    from PIL import Image

    limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        with Image.open(path) as opened:
            return f"{opened.width}x{opened.height} ({opened.width * opened.height} pixels)"
    except Exception:  # noqa: BLE001 - only the message's detail is lost
        return "size unknown"
    finally:
        Image.MAX_IMAGE_PIXELS = limit


@contextlib.contextmanager
def pixel_limit() -> Iterator[None]:
    """PIL's decompression-bomb limit set from :data:`MAX_PIXELS_ENV` for the block (as it was when unset)."""
    from PIL import Image

    limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, _pixel_limit()
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def too_large(path: Path, limit: Any) -> str:
    """The message for an image PIL refused as a decompression bomb: the file, its size, the limit, the fix."""
    return (f"{path}: the image is {_claimed_size(path)}, over twice PIL's decompression-bomb limit of {limit} "
            f"pixels; downscale it, or if you trust the file raise the limit: set {MAX_PIXELS_ENV}=<pixels> (or none) "
            "in the environment, or PIL.Image.MAX_IMAGE_PIXELS in Python.")


@contextlib.contextmanager
def _refusing(path: Path, error: type, fix: str) -> Iterator[None]:
    """Within the block, PIL's refusals of ``path`` become ``error`` naming the file and ``fix``."""
    from PIL import Image, UnidentifiedImageError

    with pixel_limit():
        try:
            yield
        except Image.DecompressionBombError:
            raise error(too_large(path, Image.MAX_IMAGE_PIXELS)) from None
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:  # PIL's ways to report broken files
            raise error(f"{path}: cannot read the image ({err}); {fix}.") from err


def open_rgb(path: Union[str, Path], error: type = ValueError, fix: str = "replace or remove it",
             upright: bool = True):
    """The image file at ``path`` as an RGB PIL image, EXIF orientation applied unless ``upright=False`` (datasets
    whose reference code reads the stored pixels as they are). An unreadable or truncated file, or one over PIL's
    decompression-bomb limit, raises ``error`` (an exception taking one message) naming the file and ``fix``; the
    limit message gives the size and how to raise the limit (:data:`MAX_PIXELS_ENV` or
    ``PIL.Image.MAX_IMAGE_PIXELS``)."""
    from PIL import Image, ImageOps

    path = Path(path)
    with _refusing(path, error, fix):
        with Image.open(path) as opened:
            return (ImageOps.exif_transpose(opened) if upright else opened).convert("RGB")


def image_size(path: Union[str, Path], error: type = ValueError, fix: str = "replace or remove it") -> tuple[int, int]:
    """(W, H) of the image file at ``path`` from its header (no pixels are read), with the refusals of
    :func:`open_rgb`."""
    from PIL import Image

    path = Path(path)
    with _refusing(path, error, fix):
        with Image.open(path) as opened:
            return opened.size
