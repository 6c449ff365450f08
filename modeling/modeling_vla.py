"""A robot action model (VLA) on any registered VLM family: camera image(s) + instruction (+ robot state) → actions.

Three action heads, chosen by `config.action_head`:

- `"regression"`: an MLP on the pooled VLM state (the last non-padding token's hidden state, with the projected
  state next to it) regresses a normalised action chunk, L1 loss (ACT-style chunking);
- `"tokens"`: RT-2 / OpenVLA: every action dimension is cut into `num_action_bins` bins that are the last ids of the
  language model's vocabulary; the bin tokens follow the prompt, are trained with the language-model loss and are
  predicted with `generate`, decoding restricted to the bin ids;
- `"flow"`: a flow-matching action expert (π0's recipe, `FlowMatchingHead`) conditioned on the pooled VLM state,
  sampled from noise in `flow_num_steps` Euler steps.

Imports only torch, transformers and the other model-side files: this file ships as remote code.
"""

import copy
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch.nn import functional as F
from transformers import LogitsProcessor, LogitsProcessorList, PreTrainedModel
from transformers.utils import ModelOutput

from ..configuration.configuration_vla import VLAConfig
from ..configuration.constants import HEAD_ACTIONS, TASK_ACTION_PREDICTION
from .heads import MLP, FlowMatchingHead, check_activations, check_tensor, last_token_state
from .modeling_vlm_heads import VLMHeadPreTrainedModel, check_image_tokens, sequence_states

# The token type a family's `generate` gives the tokens after the prompt, where that differs from 0: PaliGemma
# attends bidirectionally inside the prefix (type 0) and causally over the suffix (type 1).
SUFFIX_TOKEN_TYPE = {"paligemma": 1}


@dataclass
class VLAOutput(ModelOutput):
    """Outputs of `VLAForActionPrediction`.

    loss (`torch.FloatTensor` of shape `()`, *optional*):
        The head's loss when `actions` are given: L1 on normalised actions (`"regression"`), the language-model loss
        on the action tokens (`"tokens"`), the flow-matching loss (`"flow"`).
    actions (`torch.FloatTensor` of shape `(B, chunk_size, action_dim)`, *optional*):
        Predicted actions in the data's units: the regression; the flow head's sample (in eval mode); the tokens
        head's most likely bins given the true previous action tokens (teacher forcing, when `actions` are given).
        `predict_actions` decodes the tokens head with `generate`.
    logits (`torch.FloatTensor` of shape `(B, chunk_size * action_dim, vocab_size)`, *optional*):
        Language-model logits at the action token positions (`"tokens"`).
    pooled_state (`torch.FloatTensor` of shape `(B, H)`, *optional*):
        The VLM state the `"regression"` and `"flow"` heads read.
    """

    loss: torch.FloatTensor | None = None
    actions: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    pooled_state: torch.FloatTensor | None = None


class ActionBinsLogitsProcessor(LogitsProcessor):
    """Restricts decoding to the action bin ids `[first_bin_id, first_bin_id + num_bins)`."""

    def __init__(self, first_bin_id: int, num_bins: int):
        self.first_bin_id, self.num_bins = first_bin_id, num_bins

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        allowed = torch.full_like(scores, float("-inf"))
        bins = slice(self.first_bin_id, self.first_bin_id + self.num_bins)
        allowed[:, bins] = scores[:, bins]
        return allowed


def protected_token_ids(config) -> dict[str, int]:
    """The token ids a backbone configuration names (image, bos, eos, pad, ...): the bins must not take them."""
    found = {}
    for part in (config, config.get_text_config()):
        for key, value in vars(part).items():
            if not key.endswith(("token_id", "token_index", "token_ids")) or value is None:
                continue
            for index, token_id in enumerate(value if isinstance(value, (list, tuple)) else [value]):
                if isinstance(token_id, int) and token_id >= 0:
                    found[key if isinstance(value, int) else f"{key}[{index}]"] = token_id
    return found


def _check_left_padded(attention_mask: torch.Tensor | None) -> None:
    if attention_mask is not None and not attention_mask[:, -1].bool().all():
        raise ValueError(
            "action_head='tokens' puts the action tokens right after the prompt: pad the prompts on the left "
            "(processor(..., padding_side='left')); this attention_mask ends with padding."
        )


class VLAForActionPrediction(VLMHeadPreTrainedModel):
    """A VLA on a VLM of any registered family: images + instruction (+ state (B, state_dim)) → actions
    (B, chunk_size, action_dim), with the action head `config.action_head`.

    Build it on a backbone with `VLAForActionPrediction.from_backbone(create_vlm("smolvlm", tiny=True),
    action_head="flow", action_dim=7)`, or load it with `from_pretrained`. Inputs are the family processor's
    outputs for the prompt (for `"tokens"`, left-padded and without the action tokens: the model appends them);
    `actions` are in the data's units, normalised inside with the statistics in the config.
    """

    config_class = VLAConfig
    config: VLAConfig
    head_kind = HEAD_ACTIONS
    model_card_template = "vla.md"
    model_card_tags = ("robotics", "vision-language-action")
    pipeline_tag = "robotics"
    pipelines = {TASK_ACTION_PREDICTION: "..processing.pipeline_vla_actions.ActionPredictionPipeline"}
    # Every module a VLA may add; each model lists the ones it has in `self.head_modules`.
    head_modules: ClassVar[tuple[str, ...]] = ("action_head", "state_projector")

    def __init__(self, config: VLAConfig, backbone: PreTrainedModel | None = None):
        super().__init__(config, backbone)
        config.check_action_settings()
        check_activations(config, ("head_hidden_act",))
        hidden_size = config.hidden_size
        condition_dim = hidden_size
        if config.state_dim:
            if config.action_head == "tokens":
                raise ValueError(
                    "state_dim must be 0 for action_head='tokens': RT-2 / OpenVLA read no state vector; write the "
                    "state into the instruction, or use the 'regression' or 'flow' head."
                )
            self.state_projector = MLP(config.state_dim, [], hidden_size, config.head_hidden_act)
            condition_dim += hidden_size
        if config.action_head == "regression":
            flat = config.chunk_size * config.action_dim
            self.action_head = MLP(condition_dim, config.head_hidden_dims, flat, config.head_hidden_act)
        elif config.action_head == "flow":
            self.action_head = FlowMatchingHead(
                condition_dim,
                config.action_dim,
                config.chunk_size,
                config.head_hidden_dims,
                num_steps=config.flow_num_steps,
                hidden_act=config.head_hidden_act,
            )
        else:
            self.check_action_bins()
        # The modules LoRA trains in full (modules_to_save): the added ones, or for the tokens head the language-model
        # head, whose bin rows predict the actions.
        if config.action_head == "tokens":
            self.head_modules = (f"backbone.{self.family.lm_head}",)
        else:
            self.head_modules = tuple(name for name in ("action_head", "state_projector") if hasattr(self, name))
        self.post_init()

    def statistic(self, name: str, device: torch.device) -> torch.Tensor:
        """A normalisation statistic of the config (e.g. `"action_mean"`) as a float32 tensor (D,) on `device`."""
        return torch.tensor(getattr(self.config, name), dtype=torch.float32, device=device)

    # Action bins of the "tokens" head.

    @property
    def vocab_size(self) -> int:
        """Rows of the language model's output layer."""
        return self.backbone.get_output_embeddings().weight.shape[0]

    @property
    def first_bin_id(self) -> int:
        """Id of bin 0; bin b is token `first_bin_id + b`, the bins are the last ids of the vocabulary."""
        return self.vocab_size - self.config.num_action_bins

    def check_action_bins(self, tokenizer=None) -> None:
        """Raises a `ValueError` unless the last `num_action_bins` ids of the vocabulary are free for the bins.

        The rule: the bins may take over ordinary text tokens (OpenVLA takes Llama's least used ones), but no id that
        the backbone configuration names (image, bos, eos, pad tokens) and, given the `tokenizer`, none of its
        special or added tokens (chat markers, image tokens). `make_room_for_action_bins` grows a vocabulary whose
        special tokens sit at its end.
        """
        first, vocab_size, num_bins = self.first_bin_id, self.vocab_size, self.config.num_action_bins
        protected = protected_token_ids(self.config.backbone_config)
        if tokenizer is not None:
            added = {token_id: str(token) for token_id, token in tokenizer.added_tokens_decoder.items()}
            for token_id in tokenizer.all_special_ids:
                added.setdefault(token_id, tokenizer.convert_ids_to_tokens(token_id))
            protected.update({f"the tokenizer's {token!r}": token_id for token_id, token in added.items()})
        taken = {name: token_id for name, token_id in protected.items() if token_id >= first}
        if first < 1 or taken:
            clash = f"; {sorted(taken.items(), key=lambda item: item[1])} lie among them" if taken else ""
            raise ValueError(
                f"action_head='tokens' maps num_action_bins={num_bins} bins onto the last ids of the vocabulary "
                f"({first}..{vocab_size - 1} of {vocab_size}), which must not hold special tokens{clash}. Grow the "
                "vocabulary first (vlmheads.training.vla.make_room_for_action_bins(backbone, tokenizer, num_bins)) "
                "or lower num_action_bins."
            )

    def actions_to_bins(self, actions: torch.Tensor) -> torch.LongTensor:
        """Bin indices (B, T, D) in [0, num_action_bins) of actions (B, T, D): [low, high] cut into equal bins."""
        num_bins = self.config.num_action_bins
        low, high = self.statistic("action_low", actions.device), self.statistic("action_high", actions.device)
        unit = (actions.float() - low) / (high - low)
        return (unit * num_bins).floor().clamp(0, num_bins - 1).long()

    def bins_to_actions(self, bins: torch.LongTensor) -> torch.Tensor:
        """Actions (B, T, D) at the centres of the bins (B, T, D)."""
        low, high = self.statistic("action_low", bins.device), self.statistic("action_high", bins.device)
        unit = (bins.float() + 0.5) / self.config.num_action_bins
        return low + unit * (high - low)

    # Normalisation of the "regression" and "flow" heads.

    def normalize_actions(self, actions: torch.Tensor) -> torch.Tensor:
        """(actions - action_mean) / action_std, (..., D)."""
        device = actions.device
        return (actions.float() - self.statistic("action_mean", device)) / self.statistic("action_std", device)

    def unnormalize_actions(self, actions: torch.Tensor) -> torch.Tensor:
        """The inverse of `normalize_actions`."""
        device = actions.device
        return actions.float() * self.statistic("action_std", device) + self.statistic("action_mean", device)

    # Inputs.

    def _check_inputs(
        self, state: torch.Tensor | None, actions: torch.Tensor | None, input_ids: torch.Tensor | None, inputs: dict
    ) -> None:
        config = self.config
        if input_ids is None:
            raise ValueError("input_ids is required: the processor's tokens of the instruction (with image tokens).")
        if input_ids.shape[0] == 0:
            raise ValueError("input_ids holds an empty batch: give at least one sample.")
        check_image_tokens(config.backbone_config, input_ids, inputs.get("pixel_values") is not None)
        batch_size = input_ids.shape[0]
        if config.state_dim:
            if state is None:
                raise ValueError(f"state (B, state_dim={config.state_dim}) is required: this model reads the state.")
            check_tensor("state", state, (batch_size, config.state_dim), "(B, state_dim)")
        elif state is not None:
            raise ValueError(f"state was given but this model has state_dim=0 (got shape {tuple(state.shape)}).")
        if actions is not None:
            expected = (batch_size, config.chunk_size, config.action_dim)
            check_tensor("actions", actions, expected, "(B, chunk_size, action_dim)")

    def _condition(self, inputs: dict, state: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The pooled VLM state (B, H) and the head's condition (B, C): pooled state and projected state."""
        pooled = self.pooled_state(**inputs)
        if self.config.state_dim:
            weight = self.state_projector[0].weight
            mean, std = self.statistic("state_mean", state.device), self.statistic("state_std", state.device)
            normalized = ((state.float() - mean) / std).to(weight.dtype)
            return pooled, torch.cat([pooled.to(weight.dtype), self.state_projector(normalized)], dim=-1)
        return pooled, pooled

    def pooled_state(self, **inputs) -> torch.Tensor:
        """Hidden state (B, H) of the backbone at each sample's last non-padding prompt token (for Florence-2, of
        its encoder, which reads the image and the prompt)."""
        return last_token_state(sequence_states(self.backbone, **inputs), inputs.get("attention_mask"))

    def _with_action_tokens(self, inputs: dict, action_ids: torch.LongTensor) -> dict:
        """The prompt inputs with the action tokens (B, N) after each prompt (left padding), and every input aligned
        with the tokens (attention mask, token types, Mllama's cross-attention mask) extended to match."""
        input_ids = inputs["input_ids"]
        _check_left_padded(inputs.get("attention_mask"))
        length, count = input_ids.shape[1], action_ids.shape[1]
        extended = dict(inputs)
        extended["input_ids"] = torch.cat([input_ids, action_ids.to(input_ids.device)], dim=1)
        for name, value in inputs.items():
            if name == "input_ids" or not torch.is_tensor(value) or value.dim() < 2 or value.shape[1] != length:
                continue
            if name == "attention_mask":
                tail = value.new_ones(value.shape[0], count)
            elif name == "cross_attention_mask":
                tail = value[:, -1:].expand(-1, count, *value.shape[2:])
            else:
                fill = SUFFIX_TOKEN_TYPE.get(self.family.model_type, 0) if name == "token_type_ids" else 0
                tail = value.new_full((value.shape[0], count, *value.shape[2:]), fill)
            extended[name] = torch.cat([value, tail], dim=1)
        return extended

    def _tokens_forward(self, inputs: dict, actions: torch.Tensor | None) -> VLAOutput:
        config = self.config
        if actions is None:
            logits = self.backbone(**inputs, logits_to_keep=1).logits
            return VLAOutput(logits=logits)
        count = config.chunk_size * config.action_dim
        bins = self.actions_to_bins(actions)
        action_ids = bins.flatten(1) + self.first_bin_id
        if self.backbone.config.is_encoder_decoder:
            logits = self.backbone(**inputs, labels=action_ids).logits
        else:
            logits = self.backbone(**self._with_action_tokens(inputs, action_ids), logits_to_keep=count + 1).logits
            logits = logits[:, :-1]
        loss = F.cross_entropy(logits.float().flatten(0, 1), action_ids.flatten())
        first = self.first_bin_id
        predicted = logits[..., first : first + config.num_action_bins].argmax(dim=-1)
        return VLAOutput(loss=loss, actions=self.bins_to_actions(predicted.view_as(bins)), logits=logits)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        state: torch.Tensor | None = None,
        actions: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **inputs,
    ) -> VLAOutput:
        """`input_ids` (B, L) and the family processor's other outputs (`attention_mask`, `pixel_values`, ...),
        `state` (B, state_dim) when `config.state_dim` > 0, and for training `actions` (B, chunk_size, action_dim)
        in the data's units. Returns a `VLAOutput`.

        `labels` is not read: the targets are `actions` (PaliGemma's processor returns prompt labels unasked).
        """
        self._check_inputs(state, actions, input_ids, inputs)
        inputs = {"input_ids": input_ids, **inputs}
        config = self.config
        if config.action_head == "tokens":
            return self._tokens_forward(inputs, actions)
        pooled, condition = self._condition(inputs, state)
        loss = None
        predicted = None
        if config.action_head == "regression":
            flat = self.action_head(condition.to(self.action_head[0].weight.dtype)).float()
            normalized = flat.view(-1, config.chunk_size, config.action_dim)
            predicted = self.unnormalize_actions(normalized)
            if actions is not None:
                loss = F.l1_loss(normalized, self.normalize_actions(actions))
        else:
            if actions is not None:
                loss = self.action_head.loss(condition, self.normalize_actions(actions))
            if not self.training:
                predicted = self.unnormalize_actions(self.action_head.sample(condition))
        return VLAOutput(loss=loss, actions=predicted, pooled_state=pooled)

    @torch.no_grad()
    def predict_actions(
        self,
        input_ids: torch.LongTensor | None = None,
        state: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **inputs,
    ) -> torch.Tensor:
        """Actions (B, chunk_size, action_dim) in the data's units for the prompt inputs, with every head: the
        regression, the flow head's sample from noise, or the tokens head's bins decoded with `generate`."""
        self._check_inputs(state, None, input_ids, inputs)
        inputs = {"input_ids": input_ids, **inputs}
        config = self.config
        if config.action_head != "tokens":
            _, condition = self._condition(inputs, state)
            if config.action_head == "regression":
                flat = self.action_head(condition.to(self.action_head[0].weight.dtype)).float()
                return self.unnormalize_actions(flat.view(-1, config.chunk_size, config.action_dim))
            return self.unnormalize_actions(self.action_head.sample(condition))
        count = config.chunk_size * config.action_dim
        if not self.backbone.config.is_encoder_decoder:
            _check_left_padded(inputs.get("attention_mask"))
        # Greedy decoding of `count` bin tokens. A checkpoint that forces an eos at the end of generation
        # (Florence-2's BART) gets one token more, which is dropped: generate fills unset options from the model's
        # generation config, so the forcing cannot be switched off.
        generation_config = copy.deepcopy(self.backbone.generation_config)
        total = count + int(generation_config.forced_eos_token_id is not None)
        generation_config.update(max_new_tokens=total, min_new_tokens=total, do_sample=False, num_beams=1)
        bins_only = ActionBinsLogitsProcessor(self.first_bin_id, config.num_action_bins)
        generated = self.backbone.generate(
            **inputs, generation_config=generation_config, logits_processor=LogitsProcessorList([bins_only])
        )
        action_ids = generated[:, generated.shape[1] - total :][:, :count]
        bins = (action_ids - self.first_bin_id).view(-1, config.chunk_size, config.action_dim)
        return self.bins_to_actions(bins)


__all__ = ["ActionBinsLogitsProcessor", "VLAForActionPrediction", "VLAOutput"]
