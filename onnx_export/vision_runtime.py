"""Runs the vision graphs with ONNX Runtime; NumPy only, no torch.

`VisionEncoder`: the Qwen graph of `vision.export_vision_graph`, for images of any size up to the export's
`max_pixels`: each image is one call, fed its grid inputs computed on the host (`vision_grid.py`), and the
embeddings are concatenated, as ONNX Runtime GenAI does. `ImageFeatureEncoder`: the per-image graph of
`image_graph.export_image_features_graph` (SmolVLM).
"""

from pathlib import Path

import numpy as np
import onnxruntime as ort

from .manifest import GraphRunner
from .vision_grid import vision_cu_seqlens, vision_position_ids, vision_window_index


class VisionEncoder(GraphRunner):
    """`pixel_values` (total patches, patch_dim) and `image_grid_thw` (num_images, 3), as the Qwen processor
    returns them for images of any size → image embeddings (total image tokens, hidden)."""

    def __init__(
        self,
        out_dir: Path,
        entry: dict,
        providers: list[str],
        session_options: ort.SessionOptions | None = None,
    ):
        super().__init__(out_dir, entry, providers, session_options)
        self.patch_dim = int(entry["patch_dim"])
        self.merge = int(entry["spatial_merge_size"])
        self.output_dtype = np.float16 if entry.get("dtype") == "float16" else np.float32

    def grid_inputs(self, grid_thw: np.ndarray) -> dict[str, np.ndarray]:
        """The graph's grid-dependent inputs for one image's `grid_thw` (1, 3)."""
        inputs = {"position_ids": vision_position_ids(grid_thw, self.merge), "cu_seqlens": vision_cu_seqlens(grid_thw)}
        if self.entry["windows"]:
            window_index, cu_window_seqlens = vision_window_index(
                grid_thw, self.merge, self.entry["window_size"], self.entry["patch_size"]
            )
            inputs.update(window_index=window_index, cu_window_seqlens=cu_window_seqlens)
        return {name: value.astype(self.input_types[name]) for name, value in inputs.items()}

    def _check_grids(self, image_grid_thw: np.ndarray) -> None:
        if image_grid_thw.ndim != 2 or image_grid_thw.shape[1] != 3:
            raise ValueError(f"image_grid_thw must have shape (num_images, 3), got {image_grid_thw.shape}.")
        patch, limit = self.entry["patch_size"], self.entry.get("max_pixels")
        for index, (frames, height, width) in enumerate(image_grid_thw.tolist()):
            if frames < 1 or height < 1 or width < 1 or height % self.merge or width % self.merge:
                raise ValueError(
                    f"Image {index} has image_grid_thw {[frames, height, width]}: each entry must be positive and "
                    f"the height and width multiples of spatial_merge_size {self.merge}."
                )
            if limit is not None and height * width * patch**2 > limit:
                raise ValueError(
                    f"Image {index} is {height * patch}x{width * patch} = {height * width * patch**2} pixels, above "
                    f"max_pixels = {limit} of this export (the processor's limit): let the processor resize it "
                    "(its max_pixels), or export with a processor whose max_pixels is larger."
                )

    def __call__(self, pixel_values: np.ndarray, image_grid_thw: np.ndarray) -> np.ndarray:
        pixel_values = np.asarray(pixel_values)
        image_grid_thw = np.asarray(image_grid_thw, dtype=np.int64)
        self._check_grids(image_grid_thw)
        counts = image_grid_thw.prod(axis=1)
        expected = (int(counts.sum()), self.patch_dim)
        if pixel_values.shape != expected:
            raise ValueError(
                f"pixel_values must have shape (total patches of image_grid_thw, {self.patch_dim}) = {expected}, "
                f"got {pixel_values.shape}."
            )
        if not len(image_grid_thw):
            return np.zeros((0, int(self.entry["hidden_size"])), dtype=self.output_dtype)
        patches = pixel_values.astype(np.float32, copy=False)
        embeddings = [
            self.session.run(None, {"pixel_values": image, **self.grid_inputs(grid[None])})[0]
            for image, grid in zip(np.split(patches, np.cumsum(counts)[:-1]), image_grid_thw, strict=True)
        ]
        return np.concatenate(embeddings, axis=0)


class ImageFeatureEncoder(GraphRunner):
    """The vision graph of `image_graph.export_image_features_graph`: the processor's image inputs with an
    images-per-sample axis (`pixel_values` (B, T, 3, S, S), `pixel_attention_mask` (B, T, S, S)) → the embeddings
    of each sample's real images, (real images · tokens_per_image, hidden), samples in order. Padding images (all
    zeros, as the processor pads) are dropped, as the model's `get_image_features` drops them."""

    def __init__(
        self,
        out_dir: Path,
        entry: dict,
        providers: list[str],
        session_options: ort.SessionOptions | None = None,
    ):
        super().__init__(out_dir, entry, providers, session_options)
        self.input_names = tuple(entry["image_inputs"])

    def per_sample(self, **image_inputs: np.ndarray) -> list[np.ndarray]:
        """The embeddings of each sample's real images: B arrays (real images · tokens_per_image, hidden)."""
        missing = [name for name in self.input_names if image_inputs.get(name) is None]
        if missing:
            raise ValueError(
                f"The vision graph reads {list(self.input_names)} as the processor returns them; missing {missing}."
            )
        arrays = {name: np.asarray(image_inputs[name]) for name in self.input_names}
        pixel_values = arrays["pixel_values"]
        if pixel_values.ndim != 5:
            raise ValueError(
                f"pixel_values must have shape (B, images, channels, height, width), got {pixel_values.shape}."
            )
        leading = pixel_values.shape[:2]
        for name, value in arrays.items():
            if value.shape[:2] != leading:
                raise ValueError(f"{name} must start with pixel_values' (B, images) = {leading}, got {value.shape}.")
        real = (pixel_values != 0).reshape(*leading, -1).any(axis=-1)
        embeddings = []
        for sample in range(leading[0]):
            if not real[sample].any():
                embeddings.append(np.zeros((0, int(self.entry["hidden_size"])), np.float32))
                continue
            feeds = {
                name: value[sample][real[sample]].astype(self.input_types[name], copy=False)
                for name, value in arrays.items()
            }
            embeddings.append(self.session.run(None, feeds)[0])
        return embeddings

    def __call__(self, **image_inputs: np.ndarray) -> np.ndarray:
        return np.concatenate(self.per_sample(**image_inputs), axis=0)
