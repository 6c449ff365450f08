"""Builds a small Orion driving model offline, plans one driving sample and prints the predicted waypoints.

The model has random weights (nothing is downloaded): the demo shows the data path, not driving skill.
It then saves the model with its code, reloads it the way anyone on the Hub would
(`AutoModel.from_pretrained(..., trust_remote_code=True)`) and checks that the reloaded model plans the same.

    python examples/demo_orion.py --backbone qwen2_5_vl --output_dir outputs/orion_demo
"""

# First: importing vlmheads quiets bitsandbytes' missing-kernels warning, which transformers' Trainer utilities
# would otherwise print through peft on every run.
import vlmheads  # noqa: F401

# isort: split
import tempfile
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from transformers import AutoModel, AutoProcessor, HfArgumentParser

from vlmheads.offline import ORION_BACKBONES, tiny_orion_model, tiny_orion_processor


@dataclass
class DemoArguments:
    backbone: str = field(default="qwen2_vl", metadata={"help": f"One of {sorted(ORION_BACKBONES)}."})
    num_scene_queries: int = field(default=32, metadata={"help": "Scene query vectors per sample."})
    num_history_queries: int = field(default=8, metadata={"help": "History query vectors per sample."})
    question: str = field(default="Plan a safe trajectory for the ego car.", metadata={"help": "The prompt text."})
    seed: int = field(default=0)
    output_dir: str | None = field(
        default=None, metadata={"help": "Where to save the model; a temporary folder if unset."}
    )


def main() -> None:
    description = __doc__.split("\n\n")[0] + " Inputs: none, random driving features (schema: vlmheads.data.driving)."
    (args,) = HfArgumentParser(DemoArguments, description=description).parse_args_into_dataclasses()
    rng = np.random.default_rng(args.seed)
    processor = tiny_orion_processor(
        args.backbone, num_scene_queries=args.num_scene_queries, num_history_queries=args.num_history_queries
    )
    model = tiny_orion_model(processor, args.backbone, seed=args.seed)
    config = model.config
    hidden_size = config.text_config.hidden_size
    print(f"Built {type(model).__name__}: hidden size {hidden_size}, {model.num_parameters():,} parameters")

    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image"},
                {"type": "scene"},
                {"type": "history"},
                {"type": "can_bus"},
                {"type": "text", "text": args.question},
                {"type": "ego"},
            ],
        }
    ]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    camera = Image.fromarray(rng.integers(0, 256, (56, 84, 3), dtype=np.uint8))
    inputs = processor(
        images=[camera],
        text=[prompt],
        scene_queries=torch.randn(1, args.num_scene_queries, config.scene_query_dim),
        history_queries=torch.randn(1, args.num_history_queries, config.history_query_dim),
        can_bus=torch.randn(1, config.can_bus_dim),
        return_tensors="pt",
    )
    print(
        f"Prompt: {inputs['input_ids'].shape[1]} tokens, {int(inputs['mm_token_type_ids'].sum())} of them image tokens"
    )

    with torch.no_grad():
        trajectory = model(**inputs).trajectory[0]
    print("Predicted ego waypoints (untrained model), 2 Hz:")
    print("   t [s]      x [m]      y [m]")
    for step, (x, y) in enumerate(trajectory.tolist(), start=1):
        print(f"   {step * 0.5:5.1f}  {x:9.4f}  {y:9.4f}")

    answer_ids = model.generate(**inputs, max_new_tokens=8, do_sample=False)[0, inputs["input_ids"].shape[1] :]
    print(f"Text answer (untrained model): {processor.decode(answer_ids, skip_special_tokens=True)!r}")

    with tempfile.TemporaryDirectory() as scratch:
        output_dir = args.output_dir or scratch
        model.save_pretrained(output_dir)
        processor.save_pretrained(output_dir)
        reloaded = AutoModel.from_pretrained(output_dir, trust_remote_code=True).eval()
        reloaded_processor = AutoProcessor.from_pretrained(output_dir, trust_remote_code=True)
        with torch.no_grad():
            again = reloaded(**inputs).trajectory[0]
        driving = {name: inputs[name] for name in ("scene_queries", "history_queries", "can_bus")}
        reprocessed = reloaded_processor(images=[camera], text=[prompt], **driving, return_tensors="pt")
        if not torch.equal(reprocessed["input_ids"], inputs["input_ids"]) or not torch.allclose(again, trajectory):
            raise RuntimeError("The reloaded model does not plan like the original.")
        print(f"Saved to {args.output_dir or 'a temporary folder'} and reloaded with AutoModel: same waypoints.")


if __name__ == "__main__":
    main()
