"""Runs the vision graph of `vision.export_vision_graph` with ONNX Runtime; NumPy only, no torch.

The graph holds one image of the export resolution; several images are several calls whose embeddings are
concatenated, as ONNX Runtime GenAI does. The Qwen processor keeps an image's own size (rounded to 28 pixels), so
resize images to the export's `image_size` before the processor: any other grid is a `ValueError`.
"""

from pathlib import Path

import numpy as np
import onnxruntime as ort

from .manifest import open_graph


class VisionEncoder:
    """`pixel_values` (num_images · num_patches, patch_dim) and `image_grid_thw` (num_images, 3), as the Qwen
    processor returns them → image embeddings (num_images · num_image_tokens, hidden)."""

    def __init__(
        self,
        out_dir: Path,
        entry: dict,
        providers: list[str],
        session_options: ort.SessionOptions | None = None,
    ):
        self.entry = entry
        self.session = open_graph(out_dir, entry, providers, session_options)
        self.grid_thw = tuple(int(size) for size in entry["image_grid_thw"])
        self.num_patches = int(np.prod(self.grid_thw))
        self.patch_dim = int(entry["patch_dim"])
        self.output_dtype = np.float16 if entry.get("dtype") == "float16" else np.float32

    def __call__(self, pixel_values: np.ndarray, image_grid_thw: np.ndarray) -> np.ndarray:
        pixel_values = np.asarray(pixel_values)
        image_grid_thw = np.asarray(image_grid_thw)
        height, width = self.entry["image_size"]
        if image_grid_thw.ndim != 2 or image_grid_thw.shape[1] != 3:
            raise ValueError(f"image_grid_thw must have shape (num_images, 3), got {image_grid_thw.shape}.")
        for index, grid in enumerate(image_grid_thw.tolist()):
            if tuple(grid) != self.grid_thw:
                raise ValueError(
                    f"Image {index} has image_grid_thw {grid}; this vision graph was exported for {height}x{width} "
                    f"images, image_grid_thw {list(self.grid_thw)}. Resize images to {width}x{height} (W x H) "
                    "before the processor."
                )
        num_images = image_grid_thw.shape[0]
        expected = (num_images * self.num_patches, self.patch_dim)
        if pixel_values.shape != expected:
            raise ValueError(
                f"pixel_values must have shape (num_images * {self.num_patches} patches of a {height}x{width} image, "
                f"{self.patch_dim}) = {expected} for {num_images} images, got {pixel_values.shape}."
            )
        if num_images == 0:
            return np.zeros((0, int(self.entry["hidden_size"])), dtype=self.output_dtype)
        patches = pixel_values.astype(np.float32, copy=False)
        embeddings = [
            self.session.run(None, {"pixel_values": image})[0] for image in np.split(patches, num_images, axis=0)
        ]
        return np.concatenate(embeddings, axis=0)
