"""Receipt photos as `datasets.Dataset`s: a synthetic, learnable, balanced set, and users' own photos in class folders.

The task: how many receipts does a photo show? Classes "0", "1" and "2 or more" (label = min(count, 2)).

The synthetic photos are rendered with PIL: a textured table top with clutter (notebooks, phones, coins, pens in
non-paper colours) and 0 to 3 receipts of random size and rotation, each an off-white paper strip with a header,
lines of text of random length and a total line. Receipts are placed to overlap little, so the count stays
visible.
"""

from collections.abc import Sequence
from pathlib import Path

import datasets
import numpy as np
from datasets.utils.tqdm import tqdm
from PIL import Image, ImageDraw, ImageFilter

from ..configuration.configuration_receipt_vl import RECEIPT_COUNT_LABELS
from ..processing.image_inputs import open_image
from .sources import load_hub_dataset, local_or_hub

RECEIPT_CLASSES = tuple(RECEIPT_COUNT_LABELS.values())
MAX_RECEIPTS = 3


def receipt_label(count: int) -> int:
    """Class id of a photo holding `count` receipts: min(count, 2)."""
    if count < 0:
        raise ValueError(f"count must be non-negative, got {count}.")
    return min(count, len(RECEIPT_CLASSES) - 1)


def _table(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A wood- or fabric-like background in darker, saturated colours, so that white paper stands out."""
    base = rng.uniform(40, 150, size=3) * rng.uniform(0.5, 1.0, size=3)
    stripes = np.sin(np.linspace(0, rng.uniform(6, 30), height))[:, None, None] * rng.uniform(5, 20)
    noise = rng.normal(0, 8, size=(height, width, 3))
    pixels = np.clip(base + stripes + noise, 0, 200).astype(np.uint8)
    return Image.fromarray(pixels)


def _clutter(draw: ImageDraw.ImageDraw, rng: np.random.Generator, width: int, height: int) -> None:
    for _ in range(rng.integers(1, 5)):
        colour = tuple(int(c) for c in rng.uniform(0, 180, size=3))
        x0, y0 = rng.uniform(-0.1, 0.9) * width, rng.uniform(-0.1, 0.9) * height
        x1, y1 = x0 + rng.uniform(0.1, 0.35) * width, y0 + rng.uniform(0.05, 0.3) * height
        shape = rng.integers(3)
        if shape == 0:
            draw.rectangle((x0, y0, x1, y1), fill=colour)
        elif shape == 1:
            draw.ellipse((x0, y0, x1, y1), fill=colour)
        else:
            draw.line((x0, y0, x1, y1), fill=colour, width=int(rng.integers(1, 4)))


def _receipt(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """One receipt: an off-white strip with printed lines, on a transparent canvas, rotated by up to 30 degrees."""
    paper = int(rng.integers(225, 256))
    tint = tuple(min(255, paper + int(d)) for d in rng.integers(-12, 1, size=3))
    strip = Image.new("RGBA", (width, height), (*tint, 255))
    draw = ImageDraw.Draw(strip)
    ink = int(rng.integers(20, 90))
    margin = max(1, width // 8)
    step = max(2, height // int(rng.integers(8, 16)))
    for row, y in enumerate(range(margin, height - margin, step)):
        length = width - 2 * margin if row in (0, 1) else rng.uniform(0.3, 1.0) * (width - 2 * margin)
        start = margin + (width - 2 * margin - length) / 2 if row == 0 else margin
        draw.line((start, y, start + length, y), fill=(ink, ink, ink, 255), width=max(1, step // 3))
    return strip.rotate(float(rng.uniform(-30, 30)), expand=True, resample=Image.BICUBIC)


def render_receipt_photo(count: int, rng: np.random.Generator, width: int = 112, height: int = 112) -> Image.Image:
    """A synthetic photo (RGB, `width` x `height`) of a table holding `count` receipts."""
    if not 0 <= count <= MAX_RECEIPTS:
        raise ValueError(f"count must lie in [0, {MAX_RECEIPTS}], got {count}.")
    photo = _table(rng, width, height)
    _clutter(ImageDraw.Draw(photo), rng, width, height)
    placed: list[tuple[float, float, float, float]] = []
    while len(placed) < count:
        strip = _receipt(rng, int(rng.uniform(0.16, 0.26) * width), int(rng.uniform(0.35, 0.55) * height))
        x = int(rng.uniform(0, max(1, width - strip.width)))
        y = int(rng.uniform(0, max(1, height - strip.height)))
        box = (x, y, x + strip.width, y + strip.height)
        if all(_overlap(box, other) < 0.15 for other in placed) or len(placed) + 1 > count + 50:
            photo.paste(strip, (x, y), strip)
            placed.append(box)
    return photo.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0, 0.6))))


def _overlap(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """Intersection area over the smaller box's area."""
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return width * height / smaller


def receipt_features() -> datasets.Features:
    return datasets.Features(
        {
            "image": datasets.Image(),
            "label": datasets.ClassLabel(names=list(RECEIPT_CLASSES)),
            "receipt_count": datasets.Value("int32"),
        }
    )


def synthetic_receipts(
    num_samples: int = 300, seed: int = 0, min_size: int = 80, max_size: int = 128
) -> datasets.Dataset:
    """A balanced synthetic receipt set: `num_samples` photos (a multiple of 3), as many of each class.

    Photos are `min_size` to `max_size` pixels wide and high (varied aspect ratios); "2 or more" holds 2 or 3
    receipts. Columns: `image` (PIL), `label` (ClassLabel "0" / "1" / "2 or more"), `receipt_count`.
    """
    num_classes = len(RECEIPT_CLASSES)
    if num_samples < num_classes or num_samples % num_classes:
        raise ValueError(f"num_samples must be a positive multiple of {num_classes} (balanced), got {num_samples}.")
    if not 1 <= min_size <= max_size:
        raise ValueError(f"Need 1 <= min_size <= max_size, got {min_size} and {max_size}.")
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.repeat(np.arange(num_classes), num_samples // num_classes))
    counts = [int(label) if label < num_classes - 1 else int(rng.integers(2, MAX_RECEIPTS + 1)) for label in labels]
    images = [
        render_receipt_photo(
            count, rng, int(rng.integers(min_size, max_size + 1)), int(rng.integers(min_size, max_size + 1))
        )
        for count in tqdm(counts, desc="Rendering receipt photos")
    ]
    return datasets.Dataset.from_dict(
        {"image": images, "label": labels.tolist(), "receipt_count": counts}, features=receipt_features()
    )


def _write_photos(batch: dict, indices: list[int], folder: Path, names: list[str]) -> None:
    for image, label, index in zip(batch["image"], batch["label"], indices, strict=True):
        target = folder / names[label] / f"{index:05d}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        image.save(target)


def save_as_imagefolder(dataset: datasets.Dataset, folder: str | Path, num_proc: int | None = None) -> Path:
    """Writes the photos of a receipt set as `folder/<class name>/<index>.png`, the layout of users' own data
    (`Dataset.map` over `num_proc` processes, with a progress bar)."""
    folder = Path(folder)
    names = dataset.features["label"].names
    dataset.select_columns(["image", "label"]).map(
        _write_photos,
        batched=True,
        with_indices=True,
        num_proc=num_proc,
        fn_kwargs={"folder": folder, "names": names},
        desc="Writing receipt photos",
    )
    return folder


def _check_photos(batch: dict, indices: list[int], num_labels: int) -> None:
    for image, label, index in zip(batch["image"], batch["label"], indices, strict=True):
        if label is None or not 0 <= label < num_labels:
            raise ValueError(
                f"Record {index} ({image['path'] or 'photo in memory'}): label {label!r} is not a class id 0 ... "
                f"{num_labels - 1}."
            )
        open_image(image["path"] if image["bytes"] is None else image["bytes"], f"Record {index} image")


def check_receipt_dataset(dataset: datasets.Dataset, num_proc: int | None = None) -> None:
    """Opens every photo and checks every label with `Dataset.map(batched=True, num_proc=num_proc)` and a progress
    bar; raises a `ValueError` naming the first bad record's index and file (corrupt, truncated or empty photo)."""
    photos = dataset.select_columns(["image", "label"]).cast_column("image", datasets.Image(decode=False))
    photos.map(
        _check_photos,
        batched=True,
        with_indices=True,
        num_proc=num_proc,
        fn_kwargs={"num_labels": dataset.features["label"].num_classes},
        desc="Checking receipt photos",
    )


def load_image_folder(
    source: str | Path,
    labels: Sequence[str] | None = None,
    num_proc: int | None = None,
    what: str = "--data_dir",
) -> datasets.Dataset:
    """Labelled photos for any image classifier, checked with `check_receipt_dataset`: a local folder with one
    folder per class (`source/<label>/…`, read with `datasets.load_dataset("imagefolder", …)`), or a Hub data set id
    with `image` and `label` (ClassLabel) columns.

    `labels` are the model's class names in id order; without them the class folder names are the labels, sorted
    (the Hub set's own names). With them, the folder names (or the Hub set's names) must be exactly `labels`, and
    the `label` column then holds their ids. `what` names the argument in errors.
    """
    where = local_or_hub(source, what)
    if isinstance(where, str):
        dataset = load_hub_dataset(where, what)
        label_feature = dataset.features.get("label")
        if "image" not in dataset.column_names or not isinstance(label_feature, datasets.ClassLabel):
            raise ValueError(
                f"{what} {where}: a Hub image-classification set needs an `image` column and a `label` ClassLabel "
                f"column, found {dataset.features}."
            )
        found = sorted(label_feature.names)
    else:
        if not where.is_dir():
            raise ValueError(f"{what} {where} is a file: give the folder that holds one folder per class.")
        found = sorted(path.name for path in where.iterdir() if path.is_dir())
        if not found:
            raise ValueError(f"{what} {where} holds no class folders: put each class's photos in {where}/<label>/.")
        dataset = None
    labels = list(labels) if labels else found
    if sorted(labels) != found or len(set(labels)) != len(labels):
        raise ValueError(
            f"{what} {source} must hold one folder per class {sorted(labels)}, found {found}: the folder names are "
            "the labels."
        )
    if dataset is None:
        dataset = datasets.load_dataset("imagefolder", data_dir=str(where), split="train", num_proc=num_proc)
    # imagefolder numbers the classes in sorted order; give them the ids of `labels`.
    dataset = dataset.align_labels_with_mapping({name: index for index, name in enumerate(labels)}, "label")
    if dataset.features["label"].names != labels:  # the alignment lowercases the names
        dataset = dataset.cast_column("label", datasets.ClassLabel(names=labels))
    check_receipt_dataset(dataset, num_proc=num_proc)
    return dataset


def load_receipt_folder(
    data_dir: str | Path, class_names: Sequence[str] = RECEIPT_CLASSES, num_proc: int | None = None
) -> datasets.Dataset:
    """Users' own receipt photos, sorted into one folder per class (`data_dir/0/…`, `data_dir/1/…`,
    `data_dir/2 or more/…`): `load_image_folder` with the model's labels `class_names`."""
    return load_image_folder(data_dir, class_names, num_proc)


def majority_rate(labels: list[int] | np.ndarray) -> float:
    """Accuracy of always predicting the most frequent class."""
    counts = np.bincount(np.asarray(labels))
    return float(counts.max() / counts.sum())


def random_split(dataset: datasets.Dataset, eval_fraction: float, seed: int) -> tuple[datasets.Dataset, ...]:
    """Train and held-out splits with the same class balance (stratified on `label`)."""
    if not 0 < eval_fraction < 1:
        raise ValueError(f"eval_fraction must lie in (0, 1), got {eval_fraction}.")
    split = dataset.train_test_split(test_size=eval_fraction, seed=seed, stratify_by_column="label")
    return split["train"], split["test"]


__all__ = [
    "MAX_RECEIPTS",
    "RECEIPT_CLASSES",
    "check_receipt_dataset",
    "load_image_folder",
    "load_receipt_folder",
    "majority_rate",
    "random_split",
    "receipt_features",
    "receipt_label",
    "render_receipt_photo",
    "save_as_imagefolder",
    "synthetic_receipts",
]
