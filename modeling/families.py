"""The VLM families vlmheads knows: one entry per family, every difference between them in one table.

In the spirit of peft's model-type → target-modules mappings, each entry says which transformers classes a family
uses, where its vision tower, projector and language model sit, which modules LoRA adapts, which stay in full
precision under bitsandbytes, and how its processor marks images. Everything else (the registry, the task heads,
freezing, LoRA, quantization, the named Orion and receipt models) reads this table.

The table also declares what the runtimes need to know about a family (`positions`, `architecture`,
`onnx_exportable`, `pipeline_splittable`, `generates_text`): the server, the ONNX export and pipeline parallelism read
these fields, never a list of class names.

Adding a family: one entry here, its tiny offline configuration (`offline/tiny/<name>.py`), its published
`config.json` (`offline/public_configs/`) and its size in `tests/test_registry.py`; the parametrised suites then
cover it. Declare a capability only once its runtime's tests run on the family: `onnx_exportable` needs the ONNX
parity tests (`tests/test_onnx_*.py`), `pipeline_splittable` the token-identity tests
(`tests/test_pipeline_parallel.py`).

Imports only the standard library and transformers: this file ships as remote code with every head model.
"""

import re
from dataclasses import dataclass, field

import transformers
from transformers import PretrainedConfig, PreTrainedModel

POSITIONS_1D = "1d"
"""Position ids are one index per token."""
POSITIONS_MROPE = "mrope"
"""Position ids are 3-D (temporal, height, width) M-RoPE indices, `(3, B, L)`; images need `mm_token_type_ids`."""
DECODER_ONLY = "decoder-only"
"""Image features are spliced into the decoder's input embeddings at the image tokens."""
CROSS_ATTENTION = "cross-attention"
"""The decoder cross-attends to the image features in dedicated layers (Mllama)."""
ENCODER_DECODER = "encoder-decoder"
"""An encoder reads the image features and the prompt; a decoder generates (Florence-2)."""


@dataclass(frozen=True)
class VLMFamily:
    """One VLM family: the transformers classes, where the parts sit and the family's recipes.

    Module paths are full names inside the family's top model class (`model_class`), e.g. `"model.visual"`.
    """

    name: str
    """Registry name, e.g. `"qwen2-vl"`."""
    model_type: str
    """`config.model_type` of the family's checkpoints, e.g. `"qwen2_vl"`."""
    model_class: str
    """Name of the transformers class that `AutoModelForImageTextToText` (or the family's own Auto class) maps to."""
    config_class: str
    """Name of the transformers configuration class."""
    processor_class: str
    """Name of the transformers processor class."""
    checkpoint: str
    """The smallest public checkpoint, loaded by `create_vlm(name)`."""
    vision_tower: str
    """Path of the vision encoder."""
    projector: str
    """Path of the module that maps vision features to the language model's width (may sit in the vision tower)."""
    language_model: str
    """Path of the language model (the decoder, or the encoder-decoder for Florence-2)."""
    image_token: str
    """The image placeholder token of the family's processor."""
    image_token_expansion: str
    """How the processor expands one image into placeholder tokens."""
    lm_head: str = "lm_head"
    """Path of the language-model head."""
    lora_target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    """Leaf names of the language model's modules that LoRA adapts."""
    image_inputs: tuple[str, ...] = ("pixel_values",)
    """The processor outputs that carry the images, in the order `get_image_features` takes them."""
    checkpoints: dict[str, str] = field(default_factory=dict)
    """Further registry names (the seed's model names) and the checkpoint each loads."""
    other_model_types: tuple[str, ...] = ()
    """Other `model_type`s of checkpoints that load into `model_class` unchanged (same architecture and keys)."""
    positions: str = POSITIONS_1D
    """`POSITIONS_1D` or `POSITIONS_MROPE`: how the decoder's position ids are computed."""
    architecture: str = DECODER_ONLY
    """`DECODER_ONLY`, `CROSS_ATTENTION` or `ENCODER_DECODER`: how the language model sees the image."""
    generates_text: bool = True
    """Whether the family's model class generates text (π0 predicts actions only)."""
    onnx_exportable: bool = False
    """Whether `vlmheads.onnx_export` exports the family (and head models on it)."""
    pipeline_splittable: bool = False
    """Whether `vlmheads.parallel` splits the family's decoder into pipeline stages."""

    @property
    def config_cls(self) -> type[PretrainedConfig]:
        return getattr(transformers, self.config_class)

    @property
    def model_cls(self) -> type[PreTrainedModel]:
        return getattr(transformers, self.model_class)

    @property
    def lora_target_regex(self) -> str:
        """A peft `target_modules` regex that matches the LoRA targets inside the language model only.

        `target_modules=["q_proj", ...]` alone would also adapt vision towers whose attention uses the same names.
        """
        names = "|".join(self.lora_target_modules)
        return rf"{re.escape(self.language_model)}\..*\.({names})"

    @property
    def quantization_skip_modules(self) -> tuple[str, ...]:
        """Full module prefixes that stay in full precision under bitsandbytes: vision tower, projector, LM head.

        bitsandbytes skip lists match from the start of a module's full name, hence full prefixes.
        """
        kept = [self.vision_tower]
        if not self.projector.startswith(self.vision_tower + "."):
            kept.append(self.projector)
        return (*kept, self.lm_head)


def _qwen(
    name: str,
    model_type: str,
    prefix: str,
    checkpoint: str,
    checkpoints: dict[str, str],
    merged_patch: int = 28,
    runtimes: bool = True,
) -> VLMFamily:
    """A Qwen-VL family; `merged_patch` is the side in pixels of the 2x2 patch group behind one image token.

    `runtimes`: whether the ONNX export and pipeline parallelism run the family.
    """
    return VLMFamily(
        name=name,
        model_type=model_type,
        model_class=f"{prefix}ForConditionalGeneration",
        config_class=f"{prefix}Config",
        processor_class=f"{prefix}Processor",
        checkpoint=checkpoint,
        vision_tower="model.visual",
        projector="model.visual.merger",
        language_model="model.language_model",
        image_token="<|image_pad|>",
        image_token_expansion=f"one token per merged 2x2 patch group: (H / {merged_patch}) * (W / {merged_patch}) "
        "at the processed size",
        image_inputs=("pixel_values", "image_grid_thw"),
        checkpoints=checkpoints,
        positions=POSITIONS_MROPE,
        onnx_exportable=runtimes,
        pipeline_splittable=runtimes,
    )


_LLAVA_LIKE = {
    "vision_tower": "model.vision_tower",
    "projector": "model.multi_modal_projector",
    "language_model": "model.language_model",
}

VLM_FAMILIES: dict[str, VLMFamily] = {
    family.name: family
    for family in (
        _qwen(
            "qwen2-vl",
            "qwen2_vl",
            "Qwen2VL",
            "Qwen/Qwen2-VL-2B-Instruct",
            {"qwen2-vl-2b": "Qwen/Qwen2-VL-2B-Instruct", "qwen2-vl-7b": "Qwen/Qwen2-VL-7B-Instruct"},
        ),
        _qwen(
            "qwen2.5-vl",
            "qwen2_5_vl",
            "Qwen2_5_VL",
            "Qwen/Qwen2.5-VL-3B-Instruct",
            {"qwen2.5-vl-3b": "Qwen/Qwen2.5-VL-3B-Instruct", "qwen2.5-vl-7b": "Qwen/Qwen2.5-VL-7B-Instruct"},
        ),
        _qwen(
            "qwen3-vl",
            "qwen3_vl",
            "Qwen3VL",
            "Qwen/Qwen3-VL-2B-Instruct",
            {
                "qwen3-vl-2b": "Qwen/Qwen3-VL-2B-Instruct",
                "qwen3-vl-4b": "Qwen/Qwen3-VL-4B-Instruct",
                "qwen3-vl-8b": "Qwen/Qwen3-VL-8B-Instruct",
            },
            # Qwen3-VL's patches are 16 pixels wide (Qwen2-VL's 14).
            merged_patch=32,
            # Its interleaved M-RoPE and deepstack visual features are not exported nor split yet.
            runtimes=False,
        ),
        VLMFamily(
            name="mllama",
            model_type="mllama",
            model_class="MllamaForConditionalGeneration",
            config_class="MllamaConfig",
            processor_class="MllamaProcessor",
            checkpoint="meta-llama/Llama-3.2-11B-Vision",
            vision_tower="model.vision_model",
            projector="model.multi_modal_projector",
            language_model="model.language_model",
            image_token="<|image|>",
            image_token_expansion="one <|image|> token per image; the decoder cross-attends to the image tiles",
            # The receipt classifier's recipe: q/v projections of the self- and cross-attention layers.
            lora_target_modules=("q_proj", "v_proj"),
            image_inputs=("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask"),
            architecture=CROSS_ATTENTION,
            checkpoints={
                "llama-3.2-11b-vision": "meta-llama/Llama-3.2-11B-Vision",
                "llama-3.2-11b-vision-instruct": "meta-llama/Llama-3.2-11B-Vision-Instruct",
            },
        ),
        VLMFamily(
            name="llava",
            model_type="llava",
            model_class="LlavaForConditionalGeneration",
            config_class="LlavaConfig",
            processor_class="LlavaProcessor",
            checkpoint="llava-hf/llava-1.5-7b-hf",
            image_token="<image>",
            image_token_expansion="(image_size / patch_size)^2 tokens per image (576 at 336 px, patch 14)",
            checkpoints={"llava-v1.5-7b": "llava-hf/llava-1.5-7b-hf", "llava-v1.5-13b": "llava-hf/llava-1.5-13b-hf"},
            pipeline_splittable=True,
            **_LLAVA_LIKE,
        ),
        VLMFamily(
            name="paligemma",
            model_type="paligemma",
            model_class="PaliGemmaForConditionalGeneration",
            config_class="PaliGemmaConfig",
            processor_class="PaliGemmaProcessor",
            checkpoint="google/paligemma-3b-pt-224",
            image_token="<image>",
            image_token_expansion="image_seq_length tokens (256 at 224 px) before <bos> and the prompt",
            checkpoints={"paligemma-3b": "google/paligemma-3b-pt-224"},
            **_LLAVA_LIKE,
        ),
        VLMFamily(
            name="internvl",
            model_type="internvl",
            model_class="InternVLForConditionalGeneration",
            config_class="InternVLConfig",
            processor_class="InternVLProcessor",
            checkpoint="OpenGVLab/InternVL3-1B-hf",
            image_token="<IMG_CONTEXT>",
            image_token_expansion="<img> + image_seq_length <IMG_CONTEXT> tokens per tile + </img> (256 at 448 px)",
            # InternVL2 was not published in the HF-native format; its names load the InternVL3 -hf checkpoints.
            checkpoints={
                "internvl3-1b": "OpenGVLab/InternVL3-1B-hf",
                "internvl2-2b": "OpenGVLab/InternVL3-2B-hf",
                "internvl2-8b": "OpenGVLab/InternVL3-8B-hf",
            },
            **_LLAVA_LIKE,
        ),
        VLMFamily(
            name="florence-2",
            model_type="florence2",
            model_class="Florence2ForConditionalGeneration",
            config_class="Florence2Config",
            processor_class="Florence2Processor",
            checkpoint="florence-community/Florence-2-base",
            image_token="<image>",
            image_token_expansion="num_image_tokens tokens (577 at 768 px) before the task prompt, in the encoder",
            # BART attention names its output projection out_proj.
            lora_target_modules=("q_proj", "k_proj", "v_proj", "out_proj"),
            architecture=ENCODER_DECODER,
            checkpoints={
                "florence-2-base": "florence-community/Florence-2-base",
                "florence-2-large": "florence-community/Florence-2-large",
            },
            **_LLAVA_LIKE,
        ),
        VLMFamily(
            name="smolvlm",
            model_type="smolvlm",
            model_class="SmolVLMForConditionalGeneration",
            config_class="SmolVLMConfig",
            processor_class="SmolVLMProcessor",
            checkpoint="HuggingFaceTB/SmolVLM-256M-Instruct",
            vision_tower="model.vision_model",
            projector="model.connector",
            language_model="model.text_model",
            image_token="<image>",
            image_token_expansion="image_seq_len tokens per image split and for the global image, between "
            "<fake_token_around_image> and a <row_r_col_c> / <global-img> marker",
            image_inputs=("pixel_values", "pixel_attention_mask"),
            onnx_exportable=True,
            # SmolVLM-256M/500M-Instruct were published as Idefics3 configs; SmolVLM's classes read them as they are.
            other_model_types=("idefics3",),
            checkpoints={
                "smolvlm-256m": "HuggingFaceTB/SmolVLM-256M-Instruct",
                "smolvlm-500m": "HuggingFaceTB/SmolVLM-500M-Instruct",
            },
        ),
        VLMFamily(
            name="gemma3",
            model_type="gemma3",
            model_class="Gemma3ForConditionalGeneration",
            config_class="Gemma3Config",
            processor_class="Gemma3Processor",
            checkpoint="google/gemma-3-4b-it",
            image_token="<image_soft_token>",
            # The prompt marks an image with <start_of_image> (`Gemma3Processor.image_token`); the model replaces
            # the <image_soft_token>s it expands into (`config.image_token_id`).
            image_token_expansion="each <start_of_image> in the prompt becomes \\n\\n<start_of_image> + "
            "mm_tokens_per_image <image_soft_token> (256, average-pooled from 64 x 64 patches at 896 px) + "
            "<end_of_image>\\n\\n",
            checkpoints={"gemma-3-4b": "google/gemma-3-4b-it"},
            **_LLAVA_LIKE,
        ),
        VLMFamily(
            name="pi0",
            model_type="pi0",
            model_class="PI0ForConditionalGeneration",
            config_class="PI0Config",
            processor_class="PI0Processor",
            checkpoint="lerobot/pi0_base",
            vision_tower="model.vlm.vision_tower",
            projector="model.vlm.multi_modal_projector",
            language_model="model.vlm.language_model",
            image_token="<image>",
            image_token_expansion="PaliGemma's: image_seq_length tokens per camera before <bos> and the instruction",
            # π0 has no language-model head: its output head maps the action expert (`model.dit`) to actions.
            lm_head="action_out_proj",
            # pixel_values (B, cameras, C, H, W) and the camera mask (B, cameras); the VLM's get_image_features
            # (`model.model.vlm`) takes the pixel values of the real cameras, flattened to (N, C, H, W).
            image_inputs=("pixel_values", "pixel_attention_mask"),
            generates_text=False,
            checkpoints={"pi0-base": "lerobot/pi0_base"},
        ),
    )
}


def registry_names() -> dict[str, tuple[VLMFamily, str]]:
    """Every name the registry takes, the family names and the model names (e.g. `"qwen2-vl-7b"`) → the family
    and the checkpoint that name loads."""
    names = {}
    for family in VLM_FAMILIES.values():
        names[family.name] = (family, family.checkpoint)
        for name, checkpoint in family.checkpoints.items():
            names[name] = (family, checkpoint)
    return names


def vlm_family(name_or_model_type: str) -> VLMFamily:
    """The family registered under a name or a `model_type`; raises a `ValueError` listing the known ones."""
    if name_or_model_type in VLM_FAMILIES:
        return VLM_FAMILIES[name_or_model_type]
    for family in VLM_FAMILIES.values():
        if name_or_model_type in (family.model_type, *family.other_model_types):
            return family
    raise ValueError(f"Unknown VLM family {name_or_model_type!r}; known families: {sorted(VLM_FAMILIES)}.")


def family_of(config: PretrainedConfig) -> VLMFamily:
    """The family of a backbone configuration, found by its `model_type` (or a parent class's, for subclasses)."""
    for cls in type(config).__mro__:
        model_type = getattr(cls, "model_type", None)
        for family in VLM_FAMILIES.values():
            if model_type in (family.model_type, *family.other_model_types):
                return family
    raise ValueError(
        f"{type(config).__name__} (model_type {config.model_type!r}) is not a registered VLM family; known model "
        f"types: {sorted(family.model_type for family in VLM_FAMILIES.values())}."
    )


def get_module(model: PreTrainedModel, path: str):
    """The submodule at a dotted path, or a `ValueError` naming the path and the model class."""
    try:
        return model.get_submodule(path)
    except AttributeError as error:
        raise ValueError(f"{type(model).__name__} has no module {path!r}: {error}") from error
