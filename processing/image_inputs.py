"""Images as users give them to a processor: file paths, URLs, base64 strings, encoded bytes, PIL images, NumPy
arrays, tensors.

Files and PIL images come out upright (EXIF orientation applied), as 8-bit RGB: palette and alpha images are
composited on white, 16-bit greyscale is scaled to 8 bits rather than clipped. URLs and base64 strings go through
transformers' `load_image`. Arrays and tensors keep their layout, (H, W), (H, W, C) or (C, H, W); 16-bit ones are
scaled to 8 bits. Unusable input is a `ValueError` naming it.

This file ships with each processor's code in a saved model folder: it imports only numpy, PIL, torch and
transformers.
"""

import io
import os
from typing import Any

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch
from transformers.image_transforms import convert_to_rgb
from transformers.image_utils import is_valid_image, load_image

# PIL's modes of 16-bit greyscale PNGs and TIFFs ("I" is what older Pillow versions open them as).
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
ImageInput = PIL.Image.Image | np.ndarray | torch.Tensor


def _file_image(source: str | bytes, name: str) -> PIL.Image.Image:
    # A path to an image file that is not there (not a URL, nor base64, which never ends in ".png").
    missing = isinstance(source, str) and not source.startswith(("http://", "https://", "data:image/"))
    if missing and os.path.splitext(source)[1].lower() in PIL.Image.registered_extensions():
        if not os.path.exists(source):
            raise ValueError(f"{name}: no such file: {source}")
    try:
        if isinstance(source, bytes):
            image = PIL.Image.open(io.BytesIO(source))
        elif source.startswith(("http://", "https://", "data:image/")) or not os.path.exists(source):
            return load_image(source)
        else:
            image = PIL.Image.open(source)
        image.load()
        return image
    # Missing, corrupt and truncated files, undecodable data and failed downloads alike: name the input.
    except Exception as error:
        shown = f"{len(source)} bytes" if isinstance(source, bytes) else repr(source)
        raise ValueError(f"{name} = {shown} is not a readable image file: {error}") from error


def _upright_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """EXIF orientation applied, 16-bit greyscale scaled to 8 bits, transparency composited on white → RGB."""
    image = PIL.ImageOps.exif_transpose(image)
    if image.mode in SIXTEEN_BIT_MODES:
        image = PIL.Image.fromarray(_sixteen_to_eight_bit(np.asarray(image)))
    return PIL.Image.fromarray(convert_to_rgb(image, return_numpy=True))


def _sixteen_to_eight_bit(values: np.ndarray) -> np.ndarray:
    return np.clip(np.round(values.astype(np.float64) / 257.0), 0, 255).astype(np.uint8)


def _checked_array(image: np.ndarray | torch.Tensor, name: str) -> np.ndarray | torch.Tensor:
    shape = tuple(image.shape)
    if len(shape) not in (2, 3):
        raise ValueError(f"{name} must be one image of shape (H, W), (H, W, C) or (C, H, W), got {shape}.")
    channels_first = len(shape) == 3 and shape[0] in (1, 3, 4) and shape[-1] not in (1, 3, 4)
    height, width = shape[1:3] if channels_first else shape[:2]
    if height == 0 or width == 0:
        raise ValueError(f"{name} has zero size ({width} x {height} pixels).")
    if isinstance(image, torch.Tensor) and image.dtype == torch.uint16:
        return torch.from_numpy(_sixteen_to_eight_bit(image.numpy(force=True).astype(np.int32)))
    if isinstance(image, np.ndarray) and image.dtype == np.uint16:
        return _sixteen_to_eight_bit(image)
    return image


def open_image(image: Any, name: str = "image") -> ImageInput:
    """One image, ready for an image processor; `name` is how errors refer to it (e.g. `"images[2]"`).

    A path, URL, base64 string or encoded file bytes → an upright RGB PIL image; a PIL image → upright RGB; an
    array or tensor of shape (H, W), (H, W, C) or (C, H, W) → itself, checked (16-bit → 8-bit). Raises a
    `ValueError` naming `name` for an unreadable, corrupt or truncated file, an image of zero width or height, or
    anything else.
    """
    if isinstance(image, (str, os.PathLike, bytes)):
        image = _file_image(image if isinstance(image, bytes) else os.fspath(image), name)
    if not is_valid_image(image):
        raise ValueError(
            f"{name} must be a PIL image, a NumPy array, a tensor, an image file path, a URL or encoded image bytes, "
            f"got {type(image)}."
        )
    if not isinstance(image, PIL.Image.Image):
        return _checked_array(image, name)
    if image.width == 0 or image.height == 0:
        raise ValueError(f"{name} has zero size ({image.width} x {image.height} pixels).")
    return _upright_rgb(image)


def open_images(images: Any, name: str = "images") -> Any:
    """`open_image` over one image or (nested) lists of them, keeping the nesting; a (N, ...) 4-D array or tensor
    becomes a list of N images. Errors name the position, e.g. `images[1][0]`."""
    if isinstance(images, (list, tuple)):
        return [open_images(image, f"{name}[{index}]") for index, image in enumerate(images)]
    if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
        return [open_image(image, f"{name}[{index}]") for index, image in enumerate(images)]
    return open_image(images, name)
