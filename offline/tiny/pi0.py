"""Tiny π0 (PI0): the small offline BPE with PaliGemma's special, location and segmentation tokens, 56 x 56 pixel
camera images (16 image tokens each), a PaliGemma of width 64 with 2 layers, a Gemma action expert of width 64 with
2 layers, chunks of 4 actions of at most 64 dimensions."""

from tokenizers import Tokenizer
from transformers import PI0Config, PI0ImageProcessor, PI0Processor, PreTrainedTokenizerFast

from ..small_tokenizer import small_bpe_tokenizer_json

IMAGE_SIZE = 56
PATCH_SIZE = 14
IMAGE_SEQ_LENGTH = (IMAGE_SIZE // PATCH_SIZE) ** 2
CHUNK_SIZE = 4
# PI0Processor pads both the state and the actions to `max_state_dim`: the model's action width must match it.
# 64, not smaller: the action and state input projections then stay quantizable by bitsandbytes 4-bit on the CPU.
MAX_STATE_DIM = 64

# Gemma's first special tokens, PaliGemma's 1024 location and 128 segmentation tokens, then <image> last: like in
# PaliGemma, the image token lies one past the text vocabulary.
SPECIAL_TOKENS = (
    "<pad>",
    "<eos>",
    "<bos>",
    "<unk>",
    *(f"<loc{i:0>4}>" for i in range(1024)),
    *(f"<seg{i:0>3}>" for i in range(128)),
    "<image>",
)


def tiny_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A fresh small Gemma-style tokenizer: `vocab_size` BPE tokens, Gemma's and PaliGemma's tokens, then `<image>`."""
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(small_bpe_tokenizer_json(vocab_size, SPECIAL_TOKENS)),
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=8192,
    )


def tiny_processor() -> PI0Processor:
    size = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    image_processor = PI0ImageProcessor(
        size={"max_height": IMAGE_SIZE, "max_width": IMAGE_SIZE},
        pad_size=size,
        image_seq_length=IMAGE_SEQ_LENGTH,
    )
    return PI0Processor(
        image_processor=image_processor,
        tokenizer=tiny_tokenizer(),
        max_state_dim=MAX_STATE_DIM,
        chunk_size=CHUNK_SIZE,
    )


def tiny_config(processor: PI0Processor, **overrides) -> PI0Config:
    tokenizer = processor.tokenizer
    hidden_size = 64
    # The action expert attends to the VLM's per-layer cache: same depth, heads and head width on both sides. One
    # key/value head like π0; head width 32 keeps the key/value projections (32 outputs) quantizable on the CPU.
    attention = {"num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32}
    kwargs = {
        "vlm_config": {
            "model_type": "paligemma",
            "text_config": {
                "model_type": "gemma",
                "vocab_size": processor.image_token_id,
                "hidden_size": hidden_size,
                "intermediate_size": 2 * hidden_size,
                "max_position_embeddings": 1024,
                "bos_token_id": tokenizer.bos_token_id,
                "eos_token_id": tokenizer.eos_token_id,
                "pad_token_id": tokenizer.pad_token_id,
                **attention,
            },
            "vision_config": {
                "model_type": "siglip_vision_model",
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "image_size": processor.image_processor.pad_size["height"],
                "patch_size": PATCH_SIZE,
                "vision_use_head": False,
            },
            "projection_dim": hidden_size,
            "hidden_size": hidden_size,
            "vocab_size": processor.image_token_id,
            "image_token_id": processor.image_token_id,
        },
        "dit_config": {
            "model_type": "gemma",
            "hidden_size": hidden_size,
            "intermediate_size": 2 * hidden_size,
            **attention,
        },
        "chunk_size": processor.chunk_size,
        "max_state_dim": processor.max_state_dim,
        "max_action_dim": processor.max_state_dim,
        "num_inference_steps": 3,
    }
    return PI0Config(**{**kwargs, **overrides})
