"""The `image-classification` pipeline of `VLMForImageClassification` with `pooling="multimodal"`: the head reads the
language model's state after a prompt, so the pipeline puts each image into the family's prompt.

A `pooling="vision"` classifier needs no pipeline of its own: transformers' `ImageClassificationPipeline` feeds it
the family's image-processor outputs. A multimodal classifier ships this subclass in `config.custom_pipelines`
under the same task name, so that `pipeline("image-classification", model=folder, trust_remote_code=True)` works
for both, where vlmheads is not installed.
"""

from typing import Any

import torch
from transformers.pipelines import ImageClassificationPipeline

from .image_inputs import open_image
from .pipeline_inputs import ProcessorPipelineMixin, fetch_urls, user_prompt


class VLMImageClassificationPipeline(ProcessorPipelineMixin, ImageClassificationPipeline):
    """Classifies one image per input with a `pooling="multimodal"` `VLMForImageClassification`.

    ```python
    classifier = pipeline("image-classification", model=folder, trust_remote_code=True)
    classifier("photo.jpg", prompt="How many receipts are there?")  # [{"label": ..., "score": ...}, ...]
    ```

    `prompt` is the text the model was trained with, put after the image in the family's chat template (the bare
    text for processors without one); without it the user turn holds the image alone. `top_k`, `function_to_apply`
    and `timeout` work as in `ImageClassificationPipeline`.
    """

    processor_needed = (
        'A pooling="multimodal" classifier reads a prompt: the image-classification pipeline needs the family\'s '
        "processor"
    )

    def _sanitize_parameters(
        self,
        top_k: int | None = None,
        function_to_apply: str | None = None,
        timeout: float | None = None,
        prompt: str | None = None,
    ) -> tuple[dict, dict, dict]:
        preprocess_params, forward_params, postprocess_params = super()._sanitize_parameters(
            top_k=top_k, function_to_apply=function_to_apply, timeout=timeout
        )
        if prompt is not None:
            if not isinstance(prompt, str):
                raise ValueError(f"prompt must be a string, got {type(prompt).__name__}.")
            preprocess_params["prompt"] = prompt
        return preprocess_params, forward_params, postprocess_params

    def preprocess(self, image: Any, timeout: float | None = None, prompt: str = "") -> dict[str, torch.Tensor]:
        image = open_image(fetch_urls([image], timeout)[0], "image")
        text = user_prompt(self.processor, prompt, num_images=1)
        inputs = self.processor(images=[[image]], text=[text], return_tensors="pt")
        # PaliGemma's processor adds next-token labels of the prompt; the classifier's labels are class ids.
        inputs.pop("labels", None)
        return inputs.to(self.dtype)
