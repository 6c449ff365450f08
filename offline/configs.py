"""Configurations to build models without downloading: tiny random ones for tests and demos, and the public
`config.json` of real checkpoints to check shapes on the `meta` device."""

import json
import re
from importlib.resources import files
from typing import Any

_PUBLIC_CONFIG_DIR = files(__package__) / "public_configs"


def public_config_file_name(repo_id: str) -> str:
    """The stored file of `repo_id`'s config: `Qwen/Qwen2.5-VL-3B-Instruct` → `qwen2_5_vl_3b_instruct.json`."""
    return re.sub(r"[^a-z0-9]+", "_", repo_id.split("/")[-1].lower()) + ".json"


def stored_public_configs() -> list[str]:
    """File names of the public configs stored in this package."""
    return sorted(path.name for path in _PUBLIC_CONFIG_DIR.iterdir() if path.name.endswith(".json"))


def public_config(repo_id: str) -> dict[str, Any]:
    """The `config.json` published with `repo_id` on the Hub, stored in this package."""
    path = _PUBLIC_CONFIG_DIR / public_config_file_name(repo_id)
    if not path.is_file():
        raise ValueError(f"No stored config for {repo_id!r}; stored: {stored_public_configs()}.")
    return json.loads(path.read_text())


def tiny_qwen2_vl_kwargs(vocab_size: int, hidden_size: int = 64, num_hidden_layers: int = 2) -> dict[str, Any]:
    """Keyword arguments of a tiny random `Qwen2VLConfig` whose vision tower matches `tiny_image_processor()`.

    Token ids are the real Qwen2-VL ones when the vocabulary is large enough, so the offline Qwen2 tokenizer fits.
    """
    real_ids = vocab_size > 151656
    head_dim = 16
    return {
        "text_config": {
            "vocab_size": vocab_size,
            "hidden_size": hidden_size,
            "intermediate_size": 2 * hidden_size,
            "num_hidden_layers": num_hidden_layers,
            "num_attention_heads": hidden_size // head_dim,
            "num_key_value_heads": max(1, hidden_size // head_dim // 2),
            "max_position_embeddings": 4096,
            "rope_parameters": {"rope_type": "default", "mrope_section": [4, 2, 2]},
            "bos_token_id": 151643 if real_ids else 0,
            "eos_token_id": 151645 if real_ids else 1,
            "pad_token_id": 151643 if real_ids else 2,
        },
        "vision_config": {
            "depth": 2,
            "embed_dim": 32,
            "hidden_size": hidden_size,
            "mlp_ratio": 2,
            "num_heads": 4,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        "vision_start_token_id": 151652 if real_ids else 3,
        "vision_end_token_id": 151653 if real_ids else 4,
        "image_token_id": 151655 if real_ids else 5,
        "video_token_id": 151656 if real_ids else 6,
        "tie_word_embeddings": True,
    }


def tiny_qwen2_5_vl_kwargs(vocab_size: int, hidden_size: int = 64, num_hidden_layers: int = 2) -> dict[str, Any]:
    """Keyword arguments of a tiny random `Qwen2_5_VLConfig`; same text model as `tiny_qwen2_vl_kwargs`."""
    kwargs = tiny_qwen2_vl_kwargs(vocab_size, hidden_size, num_hidden_layers)
    kwargs["vision_config"] = {
        "depth": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 4,
        "out_hidden_size": hidden_size,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "window_size": 56,
        "fullatt_block_indexes": [1],
        "tokens_per_second": 2,
    }
    return kwargs


def tiny_image_processor_kwargs() -> dict[str, Any]:
    """Qwen2-VL image processor settings for small images: 56 x 56 pixels give 2 x 2 = 4 image tokens."""
    return {
        "min_pixels": 56 * 56,
        "max_pixels": 112 * 112,
        "patch_size": 14,
        "merge_size": 2,
        "temporal_patch_size": 2,
    }


def tiny_mllama_kwargs(
    vocab_size: int,
    image_token_index: int,
    hidden_size: int = 64,
    num_hidden_layers: int = 2,
    image_size: int = 32,
    patch_size: int = 8,
    bos_token_id: int = 0,
    eos_token_id: int = 1,
    pad_token_id: int = 2,
) -> dict[str, Any]:
    """Keyword arguments of a tiny random `MllamaConfig`: the last decoder layer cross-attends, the vision tower
    reads tiles of `image_size` pixels (match the image processor's `size`) and outputs its last and first layers.

    Like Llama-3.2-Vision, `<|image|>` may sit at `image_token_index == vocab_size`: the embedding table has 8
    rows more than the vocabulary. bitsandbytes' 4-bit layers run on the CPU only for inputs at least 64 wide
    (one quantization block), hence the default `hidden_size`.
    """
    vision_hidden = 32
    return {
        "text_config": {
            "vocab_size": vocab_size,
            "hidden_size": hidden_size,
            "intermediate_size": 2 * hidden_size,
            "num_hidden_layers": num_hidden_layers,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "cross_attention_layers": [num_hidden_layers - 1],
            "max_position_embeddings": 1024,
            "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0},
            "bos_token_id": bos_token_id,
            "eos_token_id": eos_token_id,
            "pad_token_id": pad_token_id,
        },
        "vision_config": {
            "image_size": image_size,
            "patch_size": patch_size,
            "hidden_size": vision_hidden,
            "intermediate_size": 2 * vision_hidden,
            "num_hidden_layers": 2,
            "num_global_layers": 1,
            "attention_heads": 4,
            "intermediate_layers_indices": [0],
            "vision_output_dim": 2 * vision_hidden,
            "max_num_tiles": 4,
        },
        "image_token_index": image_token_index,
    }
