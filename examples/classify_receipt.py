"""Classifies one photo with a saved receipt classifier, prints the class probabilities, and answers a question.

The folder is what `train_receipts.py` (or `save_pretrained` / the Hub) gives: it carries its own code, so this
script loads it with the Auto classes and `trust_remote_code=True`, as anyone without vlmheads would.

    python examples/classify_receipt.py --model outputs/receipts --image photo.jpg --question "What is the total?"
"""

from dataclasses import dataclass, field

import torch
from transformers import AutoModelForImageClassification, AutoProcessor, HfArgumentParser


@dataclass
class ClassifyArguments:
    model: str = field(metadata={"help": "A saved receipt classifier: folder or Hub id."})
    image: str = field(metadata={"help": "The photo to classify (any format PIL reads)."})
    question: str = field(default="What is written on the receipt?", metadata={"help": "Asked about the photo."})
    max_new_tokens: int = field(default=24)


def main() -> None:
    description = __doc__.split("\n\n")[0] + " Inputs: a folder saved by train_receipts.py and one photo."
    (args,) = HfArgumentParser(ClassifyArguments, description=description).parse_args_into_dataclasses()
    model = AutoModelForImageClassification.from_pretrained(args.model, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(args.model, trust_remote_code=True)

    prompt = processor.classification_prompt() if model.config.pooling == "multimodal" else None
    inputs = processor(images=[args.image], text=None if prompt is None else [prompt], return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
    (ranking,) = processor.post_process_classification(logits)
    print(f"{args.image}: {ranking[0]['label']} receipt(s)")
    for entry in ranking:
        print(f"  {entry['label']:>10}  {entry['score']:.3f}")

    question = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": args.question}]}],
        add_generation_prompt=True,
    )
    answer_inputs = processor(images=[args.image], text=[question], return_tensors="pt")
    generated = model.generate(**answer_inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
    answer = processor.decode(generated[0, answer_inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    print(f"Q: {args.question}\nA: {answer!r}")


if __name__ == "__main__":
    main()
