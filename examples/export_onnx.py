"""Exports a model to ONNX graphs with a manifest, for `vlmheads.onnx_export.OnnxVLM` (ONNX Runtime, no PyTorch).

A saved folder (Orion, a receipt classifier, a plain Qwen2-VL / Qwen2.5-VL / SmolVLM checkpoint), or a tiny random
model:

    python examples/export_onnx.py --model outputs/orion_demo --out_dir outputs/orion_demo_onnx --image_size 56 56
    python examples/export_onnx.py --tiny orion_qwen2_vl --out_dir /tmp/orion_onnx --image_size 56 56

The Qwen vision graph takes images of any size up to the processor's `max_pixels`; `--image_size` (H W, a multiple
of 28) is the example it is traced on and the size of the sample image. Besides the graphs, the folder gets the
processor and `sample_inputs.npz`: the processor's outputs for one prompt with a random image (and random driving
features for Orion), ready for `OnnxVLM`. Quantize the decoder afterwards with
`vlmheads.onnx_export.quantize.quantize_decoder(out_dir, bits=4)` (or `bits=8`).
"""

# First: importing vlmheads quiets bitsandbytes' missing-kernels warning, which transformers' Trainer utilities
# would otherwise print through peft on every run.
import vlmheads  # noqa: F401

# isort: split
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor, HfArgumentParser

from vlmheads.offline import tiny_orion_model, tiny_orion_processor
from vlmheads.offline.receipt import tiny_receipt_model, tiny_receipt_processor
from vlmheads.onnx_export import OnnxVLM, export_onnx
from vlmheads.registry.vlms import create_vlm, load_processor

TINY = ("qwen2_vl", "qwen2_5_vl", "orion_qwen2_vl", "orion_qwen2_5_vl", "receipt")
PLAIN_MODEL_TYPES = {"qwen2_vl": "qwen2-vl", "qwen2_5_vl": "qwen2.5-vl"}


@dataclass
class ExportArguments:
    out_dir: str = field(metadata={"help": "Folder for the graphs, manifest.json, the processor and sample inputs."})
    model: str | None = field(default=None, metadata={"help": "A saved model folder (or Hub id)."})
    tiny: str | None = field(default=None, metadata={"help": f"Export a tiny random model instead: one of {TINY}."})
    image_size: list[int] = field(
        default_factory=lambda: [672, 672], metadata={"help": "H W of the traced example image."}
    )
    dtype: str = field(default="float32", metadata={"help": "float32 or float16."})
    vision: bool = field(default=True, metadata={"help": "Export the vision graph (--vision false: text only)."})


def load(args: ExportArguments):
    """The model (eval mode) and processor named by `--model` or `--tiny`."""
    if (args.model is None) == (args.tiny is None):
        raise ValueError("Give exactly one of --model and --tiny.")
    if args.tiny is not None:
        if args.tiny not in TINY:
            raise ValueError(f"--tiny must be one of {TINY}, got {args.tiny!r}.")
        if args.tiny == "receipt":
            processor = tiny_receipt_processor()
            return tiny_receipt_model(processor), processor
        if args.tiny.startswith("orion_"):
            processor = tiny_orion_processor(args.tiny.removeprefix("orion_"))
            return tiny_orion_model(processor, args.tiny.removeprefix("orion_")), processor
        name = PLAIN_MODEL_TYPES[args.tiny]
        return create_vlm(name, tiny=True).eval(), load_processor(name, tiny=True)
    config = AutoConfig.from_pretrained(args.model, trust_remote_code=True)
    # vlmheads registers its models with AutoModel; plain Qwen checkpoints need the class with the LM head.
    auto_class = AutoModelForImageTextToText if config.model_type in PLAIN_MODEL_TYPES else AutoModel
    model = auto_class.from_pretrained(args.model, trust_remote_code=True).eval()
    return model, AutoProcessor.from_pretrained(args.model, trust_remote_code=True)


def sample_inputs(model, processor, image_size: tuple[int, int]) -> dict[str, np.ndarray]:
    """The processor's outputs (NumPy) for one prompt with a random `image_size` image."""
    height, width = image_size
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8))
    if not hasattr(model, "driving_embeddings"):
        if not hasattr(processor, "apply_chat_template") or not hasattr(model, "lm_head"):
            return dict(processor(images=[[image]], return_tensors="np"))
        content = [{"type": "image"}, {"type": "text", "text": "Describe the image."}]
        prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        return dict(processor(images=[image], text=[prompt], return_tensors="np"))
    config = model.config
    content = [{"type": kind} for kind in ("image", "scene", "history", "can_bus")]
    content += [{"type": "text", "text": "Plan a safe trajectory for the ego car."}, {"type": "ego"}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    rng = np.random.default_rng(0)
    driving = {
        "scene_queries": rng.standard_normal((1, config.num_scene_queries, config.scene_query_dim), np.float32),
        "history_queries": rng.standard_normal((1, config.num_history_queries, config.history_query_dim), np.float32),
        "can_bus": rng.standard_normal((1, config.can_bus_dim), np.float32),
    }
    return dict(processor(images=[image], text=[prompt], return_tensors="np", **driving))


def main() -> None:
    description = __doc__.split("\n\n")[0] + " Inputs: a saved model folder (with its processor) or --tiny."
    (args,) = HfArgumentParser(ExportArguments, description=description).parse_args_into_dataclasses()
    logging.basicConfig(format="%(asctime)s %(message)s", datefmt="%H:%M:%S", level=logging.WARNING)
    logging.getLogger("vlmheads.onnx_export").setLevel(logging.INFO)
    if len(args.image_size) != 2:
        raise ValueError(f"--image_size takes two numbers, H W; got {args.image_size}.")
    image_size = (args.image_size[0], args.image_size[1])
    start = time.perf_counter()
    model, processor = load(args)
    out_dir = Path(args.out_dir)
    manifest_path = export_onnx(
        model, processor, out_dir, image_size=image_size, dtype=args.dtype, include_vision=args.vision
    )
    print(f"Exported {type(model).__name__} in {time.perf_counter() - start:.1f} s: {manifest_path}")
    for path in sorted(out_dir.iterdir()):
        if path.is_file():
            print(f"  {path.name:<28} {path.stat().st_size / 1e6:10.1f} MB")
    inputs = sample_inputs(model, processor, image_size)
    np.savez(out_dir / "sample_inputs.npz", **inputs)
    vlm = OnnxVLM(out_dir)
    if vlm.kind == "classifier":
        print(f"Sample class logits (ONNX Runtime): {vlm.classify(**inputs)}")
        return
    if not args.vision:
        return
    tokens = vlm.generate(**inputs, max_new_tokens=8)
    print(f"Sample generation (ONNX Runtime): {tokens[0, inputs['input_ids'].shape[1] :].tolist()}")
    if vlm.kind == "orion":
        print(f"Sample waypoints (ONNX Runtime):\n{vlm.trajectory(**inputs)[0]}")


if __name__ == "__main__":
    main()
