"""What the pipelines do with a user's inputs before the processor: one sample dict from the call's arguments, the
prompt of a family's processor for a text and images, and images given by URL fetched with the pipeline's `timeout`.

Ships with the pipelines' code in saved model folders: it imports only transformers.
"""

from typing import Any

from transformers.image_utils import load_image


class ProcessorPipelineMixin:
    """A pipeline that reads the model folder's processor (tokenizer and image processor together): it loads as
    one and refuses a folder without one, with `processor_needed` (what needs it) leading the message. Mix in before
    `Pipeline`."""

    processor_needed: str = "This pipeline needs the model's processor"
    # None: a folder without a processor loads, and __init__ says what is missing.
    _load_processor = None
    _load_image_processor = False
    _load_video_processor = False
    _load_feature_extractor = False
    _load_tokenizer = False

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if self.processor is None:
            raise ValueError(
                f"{self.processor_needed}: save it into the model folder (processor.save_pretrained(folder)) or "
                "pass processor=..."
            )


class SampleInputsMixin:
    """`pipeline(images, **sample)` or `pipeline([{"images": ..., **sample}, ...])`: gathers the arguments named in
    `sample_keys` (images first) into one sample dict for `Pipeline.__call__`. Mix in before `Pipeline`."""

    sample_keys: tuple[str, ...] = ("images",)

    def __call__(self, images: Any = None, **kwargs: Any) -> Any:
        sample = {name: kwargs.pop(name) for name in self.sample_keys[1:] if name in kwargs}
        samples_given = isinstance(images, dict) or (
            isinstance(images, list) and len(images) > 0 and all(isinstance(item, dict) for item in images)
        )
        if samples_given:
            if sample:
                raise ValueError(f"Give {sorted(sample)} inside each sample dict, not next to a list of samples.")
            return super().__call__(images, **kwargs)
        return super().__call__({"images": images, **sample}, **kwargs)


def user_prompt(processor: Any, text: str, num_images: int) -> str:
    """The processor's chat-formatted user turn (`num_images` images, then `text`) up to the assistant's answer, or
    `text` itself for processors without a chat template (PaliGemma, Florence-2 place the image tokens themselves)."""
    if getattr(processor, "chat_template", None) is None:
        return text
    content = [{"type": "image"}] * num_images + [{"type": "text", "text": text}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def fetch_urls(images: list[Any], timeout: float | None) -> list[Any]:
    """`images` with every http(s) URL downloaded as a PIL image within `timeout` seconds; the rest unchanged (the
    processors open files, arrays and PIL images themselves, upright and as RGB)."""
    return [
        load_image(image, timeout=timeout)
        if isinstance(image, str) and image.startswith(("http://", "https://"))
        else image
        for image in images
    ]
