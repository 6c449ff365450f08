"""Tiny Florence-2: the small offline BPE with BART's and Florence-2's task and location tokens, 64 x 64 pixel
images (2 x 2 spatial tokens + 1 temporal token = 5 image tokens), a 4-stage DaViT of widths 8-64, and a BART
encoder-decoder of width 64 with 1 + 1 layers."""

from tokenizers import Tokenizer
from transformers import CLIPImageProcessor, Florence2Config, Florence2Processor, PreTrainedTokenizerFast
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from ..small_tokenizer import small_bpe_tokenizer_json

IMAGE_SIZE = 64
# DaViT downsamples by 4 x 2 x 2 x 2 = 32; the projector appends one temporal token to the spatial grid.
IMAGE_SEQ_LENGTH = (IMAGE_SIZE // 32) ** 2 + 1

BART_SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")
# The tokens Florence-2 adds to BART's vocabulary, in its order: task markers, 1000 location bins, region markers.
FLORENCE2_TOKENS = (
    "<od>",
    "</od>",
    "<ocr>",
    "</ocr>",
    *(f"<loc_{i}>" for i in range(1000)),
    "<cap>",
    "</cap>",
    "<ncap>",
    "</ncap>",
    "<dcap>",
    "</dcap>",
    "<grounding>",
    "</grounding>",
    "<seg>",
    "</seg>",
    "<sep>",
    "<region_cap>",
    "</region_cap>",
    "<region_to_desciption>",
    "</region_to_desciption>",
    "<proposal>",
    "</proposal>",
    "<poly>",
    "</poly>",
    "<and>",
)
IMAGE_TOKEN = "<image>"


def tiny_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A fresh small BART-style tokenizer: `vocab_size` BPE tokens, BART's and Florence-2's tokens, then `<image>`."""
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(
            small_bpe_tokenizer_json(vocab_size, (*BART_SPECIAL_TOKENS, *FLORENCE2_TOKENS, IMAGE_TOKEN))
        ),
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        mask_token="<mask>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        model_max_length=1024,
    )


def tiny_processor() -> Florence2Processor:
    image_processor = CLIPImageProcessor(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_center_crop=False,
        image_mean=IMAGENET_DEFAULT_MEAN,
        image_std=IMAGENET_DEFAULT_STD,
        image_seq_length=IMAGE_SEQ_LENGTH,
    )
    return Florence2Processor(image_processor=image_processor, tokenizer=tiny_tokenizer())


def tiny_config(processor: Florence2Processor, **overrides) -> Florence2Config:
    tokenizer = processor.tokenizer
    hidden_size = 64
    kwargs = {
        "text_config": {
            "model_type": "bart",
            "vocab_size": len(tokenizer),
            "d_model": hidden_size,
            "encoder_layers": 1,
            "decoder_layers": 1,
            "encoder_attention_heads": 4,
            "decoder_attention_heads": 4,
            "encoder_ffn_dim": 2 * hidden_size,
            "decoder_ffn_dim": 2 * hidden_size,
            "max_position_embeddings": 1024,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
            "decoder_start_token_id": tokenizer.eos_token_id,
            "forced_eos_token_id": tokenizer.eos_token_id,
        },
        "vision_config": {
            "depths": (1, 1, 1, 1),
            "embed_dim": (8, 16, 32, 64),
            "num_heads": (1, 2, 2, 4),
            "num_groups": (1, 2, 2, 4),
            "window_size": 4,
            "drop_path_rate": 0.0,
            "projection_dim": hidden_size,
        },
        "image_token_id": processor.image_token_id,
    }
    return Florence2Config(**{**kwargs, **overrides})
