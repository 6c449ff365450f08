"""Runs the receipt classifier graph of `classifier.export_classifier_graph` with ONNX Runtime; NumPy only."""

import numpy as np

from .manifest import GraphRunner

PIXEL_INPUTS = ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask")


class ClassifierRunner(GraphRunner):
    """The processor's outputs (pixel_values (B, I, T, 3, S, S), aspect_ratio_ids (B, I), aspect_ratio_mask
    (B, I, T); other keys such as `input_ids` or `num_tiles` are not read) → class logits (B, num_labels)."""

    def __call__(self, **processor_outputs: np.ndarray) -> np.ndarray:
        missing = [name for name in PIXEL_INPUTS if processor_outputs.get(name) is None]
        if missing:
            raise ValueError(
                f"The classifier needs {list(PIXEL_INPUTS)} as the receipt processor returns them; missing {missing}."
            )
        pixel_values = np.asarray(processor_outputs["pixel_values"], dtype=np.float32)
        aspect_ratio_ids = np.asarray(processor_outputs["aspect_ratio_ids"], dtype=np.int64)
        aspect_ratio_mask = np.asarray(processor_outputs["aspect_ratio_mask"], dtype=np.int64)
        self._check(pixel_values, aspect_ratio_ids, aspect_ratio_mask)
        feeds = {
            "pixel_values": pixel_values,
            "aspect_ratio_ids": aspect_ratio_ids,
            "aspect_ratio_mask": aspect_ratio_mask,
        }
        return self.session.run(None, feeds)[0]

    def _check(self, pixel_values: np.ndarray, aspect_ratio_ids: np.ndarray, aspect_ratio_mask: np.ndarray) -> None:
        tiles, size = self.entry["max_image_tiles"], self.entry["tile_size"]
        if pixel_values.ndim != 6 or pixel_values.shape[2:] != (tiles, 3, size, size):
            raise ValueError(
                f"pixel_values must have shape (B, images, {tiles}, 3, {size}, {size}) as the receipt processor "
                f"returns it, got {pixel_values.shape}."
            )
        batch_size, num_images = pixel_values.shape[:2]
        if aspect_ratio_ids.shape != (batch_size, num_images):
            raise ValueError(
                f"aspect_ratio_ids must have shape (B, images) = {(batch_size, num_images)}, "
                f"got {aspect_ratio_ids.shape}."
            )
        if aspect_ratio_mask.shape != (batch_size, num_images, tiles):
            raise ValueError(
                f"aspect_ratio_mask must have shape (B, images, tiles) = {(batch_size, num_images, tiles)}, "
                f"got {aspect_ratio_mask.shape}."
            )
        highest = self.entry["max_aspect_ratio_id"]
        if aspect_ratio_ids.size and (aspect_ratio_ids.min() < 0 or aspect_ratio_ids.max() > highest):
            raise ValueError(
                f"aspect_ratio_ids must lie in [0, {highest}] (0: padding image), got {aspect_ratio_ids.tolist()}."
            )
        images_per_sample = (aspect_ratio_ids != 0).sum(axis=1)
        if batch_size == 0 or (images_per_sample == 0).any():
            raise ValueError(f"Every sample needs an image; images per sample: {images_per_sample.tolist()}.")
