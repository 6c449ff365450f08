"""Images as users give them: EXIF-rotated photos, palette and alpha images, 16-bit PNGs, URLs, arrays, tensors."""

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image
from receipt_helpers import make_processor as make_receipt_processor

from vlmheads.processing.image_inputs import open_image, open_images

# EXIF orientation 6: the camera was turned; the stored pixels must be turned 90 degrees clockwise to stand upright.
ROTATE_90_CLOCKWISE = 6
RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def sideways_photo() -> Image.Image:
    """40 x 20 stored pixels, red top half and blue bottom half, tagged "rotate 90 degrees clockwise"."""
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)
    pixels[:10], pixels[10:] = RED, BLUE
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = ROTATE_90_CLOCKWISE
    image.info["exif"] = exif.tobytes()
    return image


def save(image: Image.Image, path, **kwargs) -> str:
    image.save(path, **kwargs)
    return str(path)


def assert_upright(image) -> None:
    """Upright, the stored top edge (red) is on the right and the bottom edge (blue) on the left: 20 wide, 40 high."""
    pixels = np.asarray(image)
    assert pixels.shape == (40, 20, 3)
    np.testing.assert_array_equal(pixels[:, 10:], np.broadcast_to(RED, (40, 10, 3)))
    np.testing.assert_array_equal(pixels[:, :10], np.broadcast_to(BLUE, (40, 10, 3)))


@pytest.mark.parametrize("suffix", ["png", "jpg"])
def test_a_photo_tagged_rotate_90_is_read_upright_from_a_path(tmp_path, suffix):
    path = tmp_path / f"sideways.{suffix}"
    sideways_photo().save(path, exif=sideways_photo().info["exif"], **({"quality": 100} if suffix == "jpg" else {}))
    assert Image.open(path).size == (40, 20)  # stored sideways
    image = open_image(path, "images[0]")
    if suffix == "png":
        assert_upright(image)
    else:  # JPEG rounds colours a little
        pixels = np.asarray(image).astype(int)
        assert pixels.shape == (40, 20, 3)
        assert (np.abs(pixels[2:-2, 12:] - RED) < 24).all() and (np.abs(pixels[2:-2, :8] - BLUE) < 24).all()


def test_a_tagged_pil_image_a_url_and_a_data_uri_are_read_upright(tmp_path, monkeypatch):
    assert_upright(open_image(sideways_photo()))
    buffer = io.BytesIO()
    sideways_photo().save(buffer, format="PNG", exif=sideways_photo().info["exif"])
    png = buffer.getvalue()

    class Response:
        content = png

    requested = []
    monkeypatch.setattr(
        "transformers.image_utils.httpx.get", lambda url, **kwargs: requested.append(url) or Response()
    )
    assert_upright(open_image("https://example.com/photo.png"))
    assert requested == ["https://example.com/photo.png"]
    assert_upright(open_image("data:image/png;base64," + base64.b64encode(png).decode()))


def test_palette_and_alpha_images_become_rgb_on_white(tmp_path):
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[:, :4] = (*RED, 255)  # opaque red left half, fully transparent (black) right half
    image = open_image(save(Image.fromarray(rgba), tmp_path / "alpha.png"))
    assert image.mode == "RGB"
    pixels = np.asarray(image)
    assert (pixels[:, :4] == RED).all() and (pixels[:, 4:] == WHITE).all()

    palette = Image.new("P", (8, 8), 0)
    palette.putpalette([*BLUE, *RED] + [0] * 762)
    palette.paste(1, (0, 0, 8, 4))  # red top half; index 0 (blue) is the transparent colour
    image = open_image(save(palette, tmp_path / "palette.png", transparency=0))
    pixels = np.asarray(image)
    assert image.mode == "RGB" and (pixels[:4] == RED).all() and (pixels[4:] == WHITE).all()
    opaque = open_image(save(palette, tmp_path / "opaque_palette.png"))
    assert (np.asarray(opaque)[4:] == BLUE).all()


def test_a_16_bit_png_is_scaled_to_8_bits_not_clipped(tmp_path):
    levels = np.array([[0, 257, 32896, 65535]], dtype=np.uint16).repeat(4, axis=0)
    path = save(Image.fromarray(levels), tmp_path / "depth.png")
    assert Image.open(path).mode in ("I;16", "I")  # stored with 16 bits
    pixels = np.asarray(open_image(path))
    np.testing.assert_array_equal(pixels[0, :, 0], [0, 1, 128, 255])
    assert (pixels == pixels[..., :1]).all()  # grey: R = G = B
    # Arrays and tensors of 16-bit values are scaled the same way.
    np.testing.assert_array_equal(open_image(levels)[0], [0, 1, 128, 255])
    assert open_image(torch.from_numpy(levels.astype(np.int32)).to(torch.uint16))[0].tolist() == [0, 1, 128, 255]


def test_arrays_and_tensors_pass_through_and_batches_split():
    array = np.random.default_rng(0).integers(0, 256, (6, 5, 3), dtype=np.uint8)
    assert open_image(array) is array
    tensor = torch.from_numpy(array).permute(2, 0, 1)
    assert open_image(tensor) is tensor
    opened = open_images([[array], np.stack([array, array])])
    assert len(opened) == 2 and len(opened[1]) == 2 and opened[1][1].shape == (6, 5, 3)


def test_bad_images_are_clear_errors_naming_the_input(tmp_path):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)
    with pytest.raises(ValueError, match=r"images\[1\]\[0\] = '.*corrupt.png' is not a readable image file"):
        open_images([[np.zeros((4, 4, 3), np.uint8)], [corrupt]])
    data = open(save(sideways_photo(), tmp_path / "whole.png"), "rb").read()
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(data[: len(data) - 30])
    with pytest.raises(ValueError, match=r"image = '.*truncated.png' is not a readable image file: .*truncated"):
        open_image(truncated)
    with pytest.raises(ValueError, match=r"images\[2\] has zero size \(0 x 30 pixels\)"):
        open_images([sideways_photo(), sideways_photo(), Image.new("RGB", (0, 30))])
    with pytest.raises(ValueError, match=r"images\[0\] has zero size \(0 x 30 pixels\)"):
        open_images(np.zeros((1, 30, 0, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"camera must be a PIL image, a NumPy array, a tensor, an image file path"):
        open_image(42, "camera")
    with pytest.raises(ValueError, match=r"must be one image of shape \(H, W\), \(H, W, C\) or \(C, H, W\)"):
        open_image(np.zeros((2, 2, 2, 2, 3)))


def test_both_processors_read_the_tagged_photo_file_upright(tmp_path, processor):
    path = tmp_path / "sideways.png"
    sideways_photo().save(path, exif=sideways_photo().info["exif"])
    upright = Image.fromarray(np.rot90(np.asarray(sideways_photo()), k=-1))  # turned clockwise, no EXIF tag
    assert_upright(upright)

    receipt = make_receipt_processor()
    from_file = receipt(images=[str(path)], return_tensors="pt")["pixel_values"]
    assert torch.equal(from_file, receipt(images=[upright], return_tensors="pt")["pixel_values"])
    sideways = Image.fromarray(np.asarray(sideways_photo()))  # the stored pixels, without their EXIF tag
    assert not torch.equal(from_file, receipt(images=[sideways], return_tensors="pt")["pixel_values"])

    text = ["<|vision_start|><|image_pad|><|vision_end|><ego_wp>"]
    from_file = processor(images=[path], text=text, return_tensors="pt")
    from_pil = processor(images=[upright], text=text, return_tensors="pt")
    assert torch.equal(from_file["pixel_values"], from_pil["pixel_values"])
    assert from_file["image_grid_thw"].tolist() == from_pil["image_grid_thw"].tolist()
    with pytest.raises(ValueError, match=r"images\[0\] has zero size"):
        processor(images=[np.zeros((0, 8, 3), np.uint8)], text=text)
