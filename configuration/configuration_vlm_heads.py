"""Configuration shared by the task heads that sit on any registered VLM family.

A head configuration is composite, the way transformers composes Llava or VisionEncoderDecoder: the backbone's own
configuration is a sub-config (`backbone_config`), and the head adds its settings next to it.
"""

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PretrainedConfig
from transformers.configuration_utils import SubConfigSpec
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from .remote_code import SelfContainedCodeMixin


@strict
class VLMHeadConfig(SelfContainedCodeMixin, PretrainedConfig):
    r"""
    Configuration of a task head on a VLM backbone of any registered family (see `modeling/families.py`). The
    family table is model-side code: the model checks that the backbone is a registered family when it is built.

    backbone_config (`dict` or `PretrainedConfig`):
        Configuration of the backbone VLM, e.g. a `Qwen2VLConfig`; a dict needs its `model_type`.
    base_model (`str`, *optional*):
        Hub id of the checkpoint the backbone weights came from, for the model card.
    """

    model_type = "vlm_head"
    auto_classes = ("AutoConfig",)
    sub_configs_defaults = {"backbone_config": SubConfigSpec(config_class=AutoConfig, model_type="qwen2_vl")}

    backbone_config: dict | PretrainedConfig | None = None
    base_model: str | None = None

    def __post_init__(self, **kwargs):
        if self.backbone_config is None:
            raise ValueError(
                f"{type(self).__name__} needs backbone_config: the configuration of a registered VLM family, e.g. "
                "`Qwen2VLConfig(...)` or a dict with its `model_type`."
            )
        if isinstance(self.backbone_config, dict):
            settings = dict(self.backbone_config)
            model_type = settings.pop("model_type", None)
            if model_type not in CONFIG_MAPPING:
                raise ValueError(f"backbone_config needs a known `model_type`, got {model_type!r}.")
            self.backbone_config = CONFIG_MAPPING[model_type](**settings)
        super().__post_init__(**kwargs)

    @property
    def hidden_size(self) -> int:
        """Width H of the backbone's language model: what the heads read."""
        return self.backbone_config.get_text_config().hidden_size
