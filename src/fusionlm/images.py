"""Images for vision models: reading files, and converting between Pillow images and tensors.

Pillow is an optional dependency (``pip install 'fusionlm[vision]'``): it is imported only
when an image file is read, written or resized, so text-only use never needs it. Everything
that takes an image takes an ``ImageLike``: a Pillow image, or a tensor ``[c, h, w]`` that is
``uint8`` (0..255) or floating point (0..1).
"""

from __future__ import annotations

import os
from types import ModuleType
from typing import TYPE_CHECKING, Any, TypeAlias

import numpy as np
import torch
from torch import Tensor

from fusionlm.errors import InvalidInputError

if TYPE_CHECKING:
    from PIL import Image as _PILImage

    ImageLike: TypeAlias = "_PILImage.Image | Tensor"
else:
    ImageLike: TypeAlias = Any

PILLOW_MISSING = (
    "working with image files needs Pillow, an optional dependency: pip install 'fusionlm[vision]'"
)


def pillow() -> ModuleType:
    """``PIL.Image``, imported on first use.

    Raises:
        ImportError: Pillow is not installed (the message says how to install it).
    """
    try:
        from PIL import Image
    except ImportError:
        raise ImportError(PILLOW_MISSING) from None
    return Image


def load_image(path: str | os.PathLike[str]) -> _PILImage.Image:
    """An image file as an RGB Pillow image (every vision model here reads RGB).

    Raises:
        ImportError: no Pillow.
        FileNotFoundError: no such file.
        ValueError: the file is not an image Pillow can read.
    """
    Image = pillow()
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except FileNotFoundError:
        raise FileNotFoundError(f"no image file {os.fspath(path)}") from None
    except (Image.UnidentifiedImageError, OSError, SyntaxError) as e:
        # Pillow raises SyntaxError for some truncated or corrupt headers.
        raise InvalidInputError(f"cannot read image {os.fspath(path)}: {e}") from None


def _is_pil(image: Any) -> bool:
    return type(image).__module__.startswith("PIL.")


def to_tensor(image: ImageLike) -> Tensor:
    """``image`` as float32 ``[c, h, w]`` with values in ``[0, 1]``.

    Raises:
        TypeError: not a Pillow image or a tensor.
        ValueError: a tensor that is not ``[c, h, w]``.
    """
    if _is_pil(image):
        array = np.asarray(image)
        if array.ndim == 2:
            array = array[:, :, None]
        if array.dtype == bool:
            array = array.astype(np.uint8) * 255
        return torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 255.0
    if not isinstance(image, Tensor):
        raise TypeError(
            f"an image must be a Pillow image or a tensor [c, h, w], got {type(image).__name__}"
        )
    if image.dim() != 3:
        raise InvalidInputError(
            f"an image tensor must be [c, h, w], got shape {tuple(image.shape)}"
        )
    if image.dtype == torch.uint8:
        return image.float() / 255.0
    if not image.is_floating_point():
        raise TypeError(f"an image tensor must be uint8 or floating point, got {image.dtype}")
    return image.float()


def to_pil(image: ImageLike) -> _PILImage.Image:
    """``image`` as a Pillow image (tensors: 1 channel -> "L", 3 -> "RGB", 4 -> "RGBA").

    Floating-point tensors are clamped to ``[0, 1]`` and rounded to 8 bits.

    Raises:
        ImportError: no Pillow.
        TypeError, ValueError: as ``to_tensor``; a channel count Pillow has no mode for.
    """
    Image = pillow()
    if _is_pil(image):
        return image
    if not isinstance(image, Tensor) or image.dim() != 3:
        to_tensor(image)  # raises the right error
    if image.dtype != torch.uint8:
        image = (to_tensor(image).clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)
    channels = image.shape[0]
    if channels not in (1, 3, 4):
        raise InvalidInputError(f"an image needs 1, 3 or 4 channels, got {channels}")
    array = image.permute(1, 2, 0).contiguous().numpy()
    # uint8 arrays [h, w], [h, w, 3] and [h, w, 4] become "L", "RGB" and "RGBA" images.
    return Image.fromarray(array[:, :, 0] if channels == 1 else array)


__all__ = ["PILLOW_MISSING", "ImageLike", "load_image", "pillow", "to_pil", "to_tensor"]
