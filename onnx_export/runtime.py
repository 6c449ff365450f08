"""`OnnxVLM`: runs an export of `vlmheads.onnx_export.export_onnx` with ONNX Runtime and NumPy alone (no torch, no
transformers).

It takes the processor's outputs (`return_tensors="np"`), embeds the tokens with the embedding graph, puts image
embeddings (vision graph) and Orion's projected driving features (driving graph) in place of their placeholder
tokens on the host, computes the position ids in NumPy (`mrope.py`: 3-D M-RoPE or 1-D, as the manifest's
`positions` says) and runs the decoder graph with a key/value cache.
"""

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from .manifest import MROPE_POSITIONS, ORT_TYPES, open_graph, read_manifest
from .mrope import rope_positions, text_positions
from .sampling import sample

DEFAULT_PROVIDERS = ("CPUExecutionProvider",)
# Room prefill leaves in the cache for new tokens unless told otherwise.
DEFAULT_NEW_TOKENS = 64
# The decoder graph's buffer inputs and outputs (`past_key_values.{i}.key`, `present.{i}.value`, ...) and the input
# that says how many buffer positions are filled; the export names its graph inputs and outputs with these.
PAST_PREFIX, PRESENT_PREFIX, PAST_LENGTH_INPUT = "past_key_values.", "present.", "past_sequence_length"
ATTENTION_MASK_INPUT, INPUTS_EMBEDS_INPUT, POSITION_IDS_INPUT = "attention_mask", "inputs_embeds", "position_ids"
LOGITS_OUTPUT, HIDDEN_STATES_OUTPUT = "logits", "hidden_states"
# Orion's driving inputs, the placeholder token (manifest token_ids key) each fills, in the driving graph's order.
DRIVING_FEATURES = {"scene_queries": "scene", "history_queries": "history", "can_bus": "can_bus"}


class KeyValueCache:
    """The decoder's key/value buffers, (B, kv_heads, capacity, head_dim) each, one per layer and kind: zeroed
    `OrtValue`s on the execution provider's device, bound once to the decoder session as both its past inputs and
    its present outputs (ONNX Runtime IO binding, GenAI's past-present-share-buffer idea). Each call writes its new
    keys and values into them in place; nothing of the cache is concatenated or copied on the host."""

    def __init__(
        self,
        session: ort.InferenceSession,
        shape: tuple[int, int, int, int],
        dtype: np.dtype,
        device: str,
        vocab_size: int,
        hidden_size: int,
        with_hidden_states: bool,
    ):
        self.session = session
        self.capacity = shape[2]
        self.dtype, self.hidden_size = dtype, hidden_size
        self.binding = session.io_binding()
        # Outputs that come back to the host, bound first (they lead get_outputs()): the next-token logits (B, V)
        # into one host array bound once by address, and Orion's hidden states (B, S, H), whose shape varies.
        self.logits = np.empty((shape[0], vocab_size), dtype=np.float32)
        _bind_array(self.binding, LOGITS_OUTPUT, self.logits, output=True)
        self.dynamic_outputs = [HIDDEN_STATES_OUTPUT] if with_hidden_states else []
        for name in self.dynamic_outputs:
            self.binding.bind_output(name, "cpu")
        self.num_host_outputs = 1 + len(self.dynamic_outputs)
        past = [entry.name for entry in session.get_inputs() if entry.name.startswith(PAST_PREFIX)]
        present = [entry.name for entry in session.get_outputs() if entry.name.startswith(PRESENT_PREFIX)]
        self.buffers = [ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, dtype), device, 0) for _ in past]
        for past_name, present_name, buffer in zip(past, present, self.buffers, strict=True):
            self.binding.bind_ortvalue_input(past_name, buffer)
            self.binding.bind_ortvalue_output(present_name, buffer)
        # The attention mask over the whole buffer (B, T) and the filled length P, bound once by address: each call
        # updates them in place instead of binding new arrays.
        self.attention_mask = np.zeros((shape[0], self.capacity), dtype=np.int64)
        self.past_length = np.zeros((), dtype=np.int64)
        for name, array in ((ATTENTION_MASK_INPUT, self.attention_mask), (PAST_LENGTH_INPUT, self.past_length)):
            _bind_array(self.binding, name, array)
        self.step: DecodeStep | None = None

    def run(self, attention_mask: np.ndarray, new_tokens: int, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Runs the decoder on `new_tokens` new positions after the filled ones, `attention_mask` (B, L) over all of
        them, and `feeds` (the other inputs but the buffers); returns the host outputs."""
        length = attention_mask.shape[1]
        self.attention_mask[:, :length] = attention_mask
        self.past_length[...] = length - new_tokens
        for name, value in feeds.items():
            self.binding.bind_cpu_input(name, value)
        # Unallocated again: ONNX Runtime would otherwise reuse the last call's output, whose shape may differ.
        for name in self.dynamic_outputs:
            self.binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(self.binding)
        # A copy: the next call writes the bound array again.
        results = [self.logits.copy()]
        if self.dynamic_outputs:
            outputs = self.binding.get_outputs()
            results.extend(outputs[index].numpy() for index in range(1, self.num_host_outputs))
        return results

    def run_step(
        self, embedding: ort.InferenceSession, next_tokens: np.ndarray, positions: np.ndarray, length: int
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Embeds `next_tokens` (B,) with the `embedding` session and runs the decoder on them at `positions`
        ((3, B) or (B,)) after `length` filled positions. Returns the bound logits (B, V) and, for Orion, hidden
        states (B, 1, H): the next step overwrites both."""
        if self.step is None:
            self.step = DecodeStep(self, embedding, positions.shape)
        step = self.step
        step.input_ids[:, 0] = next_tokens
        embedding.run_with_iobinding(step.embedding_binding)
        self.attention_mask[:, length] = 1
        self.past_length[...] = length
        step.position_ids[..., 0] = positions
        self.session.run_with_iobinding(self.binding)
        return self.logits, step.hidden_states


class DecodeStep:
    """The host arrays of a one-token decode step, bound once by address: the token ids (B, 1) as the embedding
    graph's input, its output (B, 1, H) as the decoder's `inputs_embeds`, the position ids ((3, B, 1) or (B, 1)) and,
    for Orion, the hidden states (B, 1, H). Each step writes ids and positions in place and runs both graphs on
    their bindings: no per-token binding, allocation or copy on the host (prefill's inputs stay bound until the
    first step rebinds the decoder's two inputs here)."""

    def __init__(self, cache: KeyValueCache, embedding: ort.InferenceSession, positions_shape: tuple[int, ...]):
        batch_size, hidden_size = cache.attention_mask.shape[0], cache.hidden_size
        self.input_ids = np.zeros((batch_size, 1), dtype=np.int64)
        self.inputs_embeds = np.zeros((batch_size, 1, hidden_size), dtype=cache.dtype)
        self.position_ids = np.zeros((*positions_shape, 1), dtype=np.int64)
        self.embedding_binding = embedding.io_binding()
        _bind_array(self.embedding_binding, embedding.get_inputs()[0].name, self.input_ids)
        _bind_array(self.embedding_binding, embedding.get_outputs()[0].name, self.inputs_embeds, output=True)
        _bind_array(cache.binding, INPUTS_EMBEDS_INPUT, self.inputs_embeds)
        _bind_array(cache.binding, POSITION_IDS_INPUT, self.position_ids)
        self.hidden_states = None
        if cache.dynamic_outputs:
            output = next(entry for entry in cache.session.get_outputs() if entry.name == HIDDEN_STATES_OUTPUT)
            self.hidden_states = np.zeros((batch_size, 1, hidden_size), dtype=ORT_TYPES[output.type])
            _bind_array(cache.binding, HIDDEN_STATES_OUTPUT, self.hidden_states, output=True)


def _bind_array(binding: ort.IOBinding, name: str, array: np.ndarray, output: bool = False) -> None:
    """Binds the host `array` to the input (or output) `name` by address: ONNX Runtime reads (writes) it in place."""
    bind = binding.bind_output if output else binding.bind_input
    bind(name, "cpu", 0, array.dtype, list(array.shape), array.ctypes.data)


@dataclass
class DecodeState:
    """Where generation stands: the last call's next-token `logits` (B, V) and `hidden_states` (B, S, H) (Orion
    exports only), the `cache` (its buffers hold the keys and values of the first L positions), the attention mask
    over those positions (B, L) and each row's last position ((3, B) for M-RoPE, (B,) for 1-D positions).

    `OnnxVLM.decode` writes the next step into the same cache buffers, so only the latest state can be continued.
    """

    logits: np.ndarray
    hidden_states: np.ndarray | None
    cache: KeyValueCache
    attention_mask: np.ndarray
    last_positions: np.ndarray


class OnnxVLM:
    """An ONNX Runtime host for an `export_onnx` folder: text generation (Qwen2-VL, Qwen2.5-VL, SmolVLM), Orion
    waypoints, and classifiers.

    `out_dir`: the folder `export_onnx` wrote. `providers`: ONNX Runtime execution providers, e.g.
    `["CUDAExecutionProvider", "CPUExecutionProvider"]` (default: CPU). `session_options`: passed to every session.
    `decoder`: the manifest's decoder graph to run, "decoder" or "decoder_int8" (after
    `vlmheads.onnx_export.quantize.quantize_decoder`); only that one is loaded. `verify_checksums=False` skips
    the SHA-256 check of the graph files against the manifest.
    """

    def __init__(
        self,
        out_dir: str | Path,
        providers: list[str] | None = None,
        session_options: ort.SessionOptions | None = None,
        decoder: str = "decoder",
        verify_checksums: bool = True,
    ):
        self.out_dir = Path(out_dir)
        self.manifest = read_manifest(self.out_dir, verify_checksums)
        self.providers = list(providers or DEFAULT_PROVIDERS)
        # Where the key/value buffers live: on the GPU under the CUDA execution provider, else in host memory.
        self.device = "cuda" if self.providers[0] == "CUDAExecutionProvider" else "cpu"
        unavailable = [name for name in self.providers if name not in ort.get_available_providers()]
        if unavailable:
            raise ValueError(
                f"Execution providers {unavailable} are not available in this onnxruntime; available: "
                f"{ort.get_available_providers()} (CUDAExecutionProvider needs the onnxruntime-gpu package)."
            )
        graphs = self.manifest["graphs"]
        decoders = [name for name in graphs if name.startswith("decoder")]
        if decoders and decoder not in decoders:
            raise ValueError(f"decoder must be one of the export's decoder graphs {decoders}, got {decoder!r}.")
        self.sessions = {
            name: open_graph(self.out_dir, entry, self.providers, session_options)
            for name, entry in graphs.items()
            if name not in ("vision", "classifier") and (name == decoder or name not in decoders)
        }
        if decoder in self.sessions and decoder != "decoder":
            self.sessions["decoder"] = self.sessions.pop(decoder)
        self.vision = None
        if "vision" in graphs:
            from .vision_runtime import ImageFeatureEncoder, VisionEncoder

            encoder = ImageFeatureEncoder if graphs["vision"].get("layout") == "images" else VisionEncoder
            self.vision = encoder(self.out_dir, graphs["vision"], self.providers, session_options)
        self.classifier = None
        if "classifier" in graphs:
            from .classifier_runtime import ClassifierRunner

            self.classifier = ClassifierRunner(self.out_dir, graphs["classifier"], self.providers, session_options)

    @property
    def kind(self) -> str:
        """What the export holds: "vlm", "orion" or "classifier"."""
        return self.manifest["kind"]

    def _require(self, *kinds: str, action: str) -> None:
        if self.kind not in kinds:
            raise ValueError(
                f"{action} needs an export of kind {' or '.join(kinds)}; {self.out_dir} is {self.kind!r}."
            )

    def _token_id(self, name: str) -> int | None:
        return self.manifest["token_ids"].get(name)

    def classify(self, **processor_outputs: np.ndarray) -> np.ndarray:
        """Class logits (B, num_labels) float32 of a `pooling="vision"` classifier for the processor's outputs.

        One-graph exports (Mllama) run the `classifier` graph; the others run the vision graph, take the mean of
        each sample's image embeddings (B, H) on the host and run the `classifier_head` graph.
        """
        self._require("classifier", action="classify")
        if self.classifier is not None:
            return self.classifier(**processor_outputs)
        embeddings = self.vision.per_sample(**processor_outputs)
        empty = [index for index, rows in enumerate(embeddings) if not len(rows)]
        if empty:
            raise ValueError(f"Samples {empty} hold no image (all-zero pixel_values); the classifier reads one.")
        pooled = np.stack([rows.astype(np.float32).mean(axis=0) for rows in embeddings])
        head = self.sessions["classifier_head"]
        (head_input,) = head.get_inputs()
        return head.run(None, {head_input.name: pooled.astype(ORT_TYPES[head_input.type])})[0]

    def embed(
        self,
        input_ids: np.ndarray,
        pixel_values: np.ndarray | None = None,
        image_grid_thw: np.ndarray | None = None,
        image_embeds: np.ndarray | None = None,
        scene_queries: np.ndarray | None = None,
        history_queries: np.ndarray | None = None,
        can_bus: np.ndarray | None = None,
        pixel_attention_mask: np.ndarray | None = None,
    ) -> np.ndarray:
        """Input embeddings (B, S, H) with image embeddings and driving features in place of their tokens.

        Images come as the processor's image inputs (`pixel_values` + `image_grid_thw` for Qwen, `pixel_values` +
        `pixel_attention_mask` for SmolVLM), run through the vision graph, or as precomputed `image_embeds` (total
        image tokens, H).
        """
        input_ids = np.asarray(input_ids, dtype=np.int64)
        inputs_embeds = self.sessions["embedding"].run(None, {"input_ids": input_ids})[0]
        image_mask = input_ids == self._token_id("image")
        if pixel_values is not None:
            if image_embeds is not None:
                raise ValueError("Give pixel_values or image_embeds, not both.")
            if self.vision is None:
                raise ValueError(f"pixel_values were given but {self.out_dir} was exported without a vision graph.")
            if self.manifest["graphs"]["vision"].get("layout") == "images":
                image_embeds = self.vision(pixel_values=pixel_values, pixel_attention_mask=pixel_attention_mask)
            elif image_grid_thw is None:
                raise ValueError("pixel_values need image_grid_thw (the processor returns both).")
            else:
                image_embeds = self.vision(np.asarray(pixel_values), np.asarray(image_grid_thw))
        num_image_tokens = int(image_mask.sum())
        if image_embeds is not None or num_image_tokens:
            rows = 0 if image_embeds is None else len(image_embeds)
            if rows != num_image_tokens:
                raise ValueError(
                    f"input_ids hold {num_image_tokens} image tokens (id {self._token_id('image')}) but there are "
                    f"{rows} image embeddings: each image token takes one embedding row."
                )
            inputs_embeds[image_mask] = np.asarray(image_embeds).astype(inputs_embeds.dtype)
        if self.kind == "orion":
            inputs_embeds = self._merge_driving(input_ids, inputs_embeds, scene_queries, history_queries, can_bus)
        elif any(value is not None for value in (scene_queries, history_queries, can_bus)):
            raise ValueError(f"Driving inputs need an Orion export; {self.out_dir} is {self.kind!r}.")
        return inputs_embeds

    def _merge_driving(
        self,
        input_ids: np.ndarray,
        inputs_embeds: np.ndarray,
        scene_queries: np.ndarray | None,
        history_queries: np.ndarray | None,
        can_bus: np.ndarray | None,
    ) -> np.ndarray:
        """Projects the driving features (driving graph) and puts their rows in place of their placeholders."""
        features = dict(zip(DRIVING_FEATURES, (scene_queries, history_queries, can_bus), strict=True))
        for name, kind in DRIVING_FEATURES.items():
            token_id = self._token_id(kind)
            if features[name] is None and (input_ids == token_id).any():
                raise ValueError(f"input_ids hold {kind} placeholder tokens (id {token_id}) but {name} is None.")
        if all(value is None for value in features.values()):
            return inputs_embeds
        batch_size = input_ids.shape[0]
        widths = {entry["name"]: entry["shape"][-1] for entry in self.manifest["graphs"]["driving"]["inputs"]}
        feeds = {}
        for name, value in features.items():
            # (B, Dc) for the CAN bus, (B, N, D) for the queries; a missing one is fed a zero row, then left out.
            shape = (batch_size, widths[name]) if name == "can_bus" else (batch_size, 1, widths[name])
            value = np.zeros(shape, np.float32) if value is None else np.asarray(value, dtype=np.float32)
            if value.ndim != len(shape) or value.shape[0] != batch_size or value.shape[-1] != widths[name]:
                layout = f"(B={batch_size}, {'' if name == 'can_bus' else 'N, '}{widths[name]})"
                raise ValueError(f"{name} must have shape {layout}, got {value.shape}.")
            feeds[name] = value
        projected = self.sessions["driving"].run(None, feeds)
        for (name, kind), rows in zip(DRIVING_FEATURES.items(), projected, strict=True):
            if features[name] is None:
                continue
            token_id = self._token_id(kind)
            mask = input_ids == token_id
            per_sample = mask.sum(axis=1)
            if (per_sample != rows.shape[1]).any():
                raise ValueError(
                    f"{name} has {rows.shape[1]} rows per sample but input_ids hold {per_sample.tolist()} {kind} "
                    f"placeholder tokens (id {token_id}) per sample."
                )
            inputs_embeds[mask] = rows.reshape(-1, rows.shape[-1]).astype(inputs_embeds.dtype)
        return inputs_embeds

    def _run_decoder(
        self, cache: KeyValueCache, inputs_embeds: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """One decoder call on S new tokens after the L - S cached ones (`attention_mask` (B, L)): logits and, for
        Orion, hidden states."""
        outputs = cache.run(
            attention_mask,
            inputs_embeds.shape[1],
            {
                INPUTS_EMBEDS_INPUT: inputs_embeds,
                POSITION_IDS_INPUT: np.ascontiguousarray(position_ids, dtype=np.int64),
            },
        )
        return outputs[0], outputs[1] if self.kind == "orion" else None

    def _prompt_positions(
        self,
        attention_mask: np.ndarray,
        mm_token_type_ids: np.ndarray | None,
        image_grid_thw: np.ndarray | None,
        image_embeds: np.ndarray | None,
    ) -> np.ndarray:
        """The prompt's position ids: (3, B, S) M-RoPE or (B, S) 1-D, as the manifest's `positions` says."""
        if self.manifest["positions"] != MROPE_POSITIONS:
            return text_positions(attention_mask)
        has_images = image_grid_thw is not None or image_embeds is not None
        if has_images and mm_token_type_ids is None:
            raise ValueError("Images need mm_token_type_ids (the processor returns them) for the M-RoPE positions.")
        if image_embeds is not None and image_grid_thw is None:
            raise ValueError("image_embeds need image_grid_thw for the M-RoPE positions of their tokens.")
        position_ids, _ = rope_positions(
            attention_mask,
            mm_token_type_ids if has_images else None,
            image_grid_thw,
            self.manifest["mrope"]["spatial_merge_size"],
        )
        return position_ids

    def _check_length(self, length: int) -> None:
        maximum = self.manifest["decoder"]["max_sequence_length"]
        if length > maximum:
            raise ValueError(
                f"The prompt and the new tokens need {length} positions; the export takes at most {maximum} "
                "(max_sequence_length in the manifest)."
            )

    def prefill(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray | None = None,
        mm_token_type_ids: np.ndarray | None = None,
        pixel_values: np.ndarray | None = None,
        image_grid_thw: np.ndarray | None = None,
        image_embeds: np.ndarray | None = None,
        scene_queries: np.ndarray | None = None,
        history_queries: np.ndarray | None = None,
        can_bus: np.ndarray | None = None,
        pixel_attention_mask: np.ndarray | None = None,
        max_new_tokens: int = DEFAULT_NEW_TOKENS,
    ) -> DecodeState:
        """Runs the prompt (B, S) through the decoder into a fresh cache with room for `max_new_tokens` more."""
        self._require("vlm", "orion", action="prefill")
        input_ids = np.asarray(input_ids, dtype=np.int64)
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must have shape (B, S), got {input_ids.shape}.")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be at least 0, got {max_new_tokens}.")
        self._check_length(input_ids.shape[1] + max_new_tokens)
        attention_mask = (
            np.ones_like(input_ids) if attention_mask is None else np.asarray(attention_mask, dtype=np.int64)
        )
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask must have the shape of input_ids {input_ids.shape}, got {attention_mask.shape}."
            )
        inputs_embeds = self.embed(
            input_ids,
            pixel_values,
            image_grid_thw,
            image_embeds,
            scene_queries,
            history_queries,
            can_bus,
            pixel_attention_mask,
        )
        position_ids = self._prompt_positions(attention_mask, mm_token_type_ids, image_grid_thw, image_embeds)
        sizes = self.manifest["decoder"]
        capacity = input_ids.shape[1] + max_new_tokens
        cache = KeyValueCache(
            self.sessions["decoder"],
            (input_ids.shape[0], sizes["num_key_value_heads"], capacity, sizes["head_dim"]),
            inputs_embeds.dtype,
            self.device,
            sizes["vocab_size"],
            inputs_embeds.shape[-1],
            with_hidden_states=self.kind == "orion",
        )
        logits, hidden_states = self._run_decoder(cache, inputs_embeds, attention_mask, position_ids)
        return DecodeState(logits, hidden_states, cache, attention_mask, position_ids[..., -1])

    def decode(self, state: DecodeState, next_tokens: np.ndarray) -> DecodeState:
        """Feeds one new token per row (B,) after `state`; returns the state one step further."""
        state = self._step(state, next_tokens)
        hidden_states = None if state.hidden_states is None else state.hidden_states.copy()
        # Copies: the next step writes the bound arrays again.
        return replace(state, logits=state.logits.copy(), hidden_states=hidden_states)

    def _step(self, state: DecodeState, next_tokens: np.ndarray) -> DecodeState:
        """`decode` whose logits and hidden states are the cache's bound arrays, valid until the next step."""
        cache = state.cache
        batch_size, length = state.attention_mask.shape
        next_tokens = np.asarray(next_tokens)
        if next_tokens.shape != (batch_size,):
            raise ValueError(
                f"next_tokens must have shape (B={batch_size},), one token per row, got {next_tokens.shape}."
            )
        if length >= cache.capacity:
            raise ValueError(
                f"The cache is full: prefill reserved {cache.capacity} positions (the prompt and its "
                "max_new_tokens); pass a larger max_new_tokens to prefill."
            )
        # Generated tokens are embedded as they are: images and driving features belong to the prompt.
        positions = state.last_positions + 1
        logits, hidden_states = cache.run_step(self.sessions["embedding"], next_tokens, positions, length)
        return DecodeState(logits, hidden_states, cache, cache.attention_mask[:, : length + 1], positions)

    def generate(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray | None = None,
        mm_token_type_ids: np.ndarray | None = None,
        pixel_values: np.ndarray | None = None,
        image_grid_thw: np.ndarray | None = None,
        image_embeds: np.ndarray | None = None,
        scene_queries: np.ndarray | None = None,
        history_queries: np.ndarray | None = None,
        can_bus: np.ndarray | None = None,
        pixel_attention_mask: np.ndarray | None = None,
        max_new_tokens: int = 20,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = 50,
        top_p: float = 1.0,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        seed: int | None = None,
    ) -> np.ndarray:
        """Token ids (B, S + N) like `model.generate`: the prompt, then up to `max_new_tokens` new tokens, rows that
        stopped (an `eos_token_id`) padded with `pad_token_id`; stops early once every row has stopped.

        Greedy by default; `do_sample=True` samples with `temperature` (raised to 0.01 when below), `top_k` and
        `top_p` (transformers' defaults and order, `sampling.py`, the NumPy twin of the server's sampler), from a
        NumPy generator seeded with `seed`. Stop and pad ids default to the exported model's.
        """
        self._require("vlm", "orion", action="generate")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}.")
        if do_sample and temperature <= 0:
            raise ValueError(f"temperature must be positive when sampling, got {temperature}.")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}.")
        input_ids = np.asarray(input_ids, dtype=np.int64)
        self._check_length(input_ids.shape[-1] + max_new_tokens)
        stop_ids = self.manifest["token_ids"]["eos"] if eos_token_id is None else eos_token_id
        stop_ids = np.asarray([stop_ids] if isinstance(stop_ids, int) else list(stop_ids), dtype=np.int64)
        pad_token_id = self._token_id("pad") if pad_token_id is None else pad_token_id
        if pad_token_id is None:
            pad_token_id = int(stop_ids[0]) if len(stop_ids) else 0
        rng = np.random.default_rng(seed)
        state = self.prefill(
            input_ids,
            attention_mask,
            mm_token_type_ids,
            pixel_values,
            image_grid_thw,
            image_embeds,
            scene_queries,
            history_queries,
            can_bus,
            pixel_attention_mask,
            max_new_tokens,
        )
        prompt_length = input_ids.shape[1]
        sequences = np.empty((input_ids.shape[0], prompt_length + max_new_tokens), dtype=np.int64)
        sequences[:, :prompt_length] = input_ids
        unfinished = np.ones(input_ids.shape[0], dtype=bool)
        for step in range(max_new_tokens):
            if do_sample:
                next_tokens = sample(state.logits, rng, temperature, top_k, top_p)
            else:
                next_tokens = state.logits.argmax(axis=-1)
            next_tokens = np.where(unfinished, next_tokens, pad_token_id)
            sequences[:, prompt_length + step] = next_tokens
            unfinished &= ~(next_tokens[:, None] == stop_ids).any(axis=1)
            if not unfinished.any() or step == max_new_tokens - 1:
                break
            state = self._step(state, next_tokens)
        return sequences[:, : prompt_length + step + 1]

    def trajectory(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray | None = None,
        mm_token_type_ids: np.ndarray | None = None,
        pixel_values: np.ndarray | None = None,
        image_grid_thw: np.ndarray | None = None,
        image_embeds: np.ndarray | None = None,
        scene_queries: np.ndarray | None = None,
        history_queries: np.ndarray | None = None,
        can_bus: np.ndarray | None = None,
        command: np.ndarray | None = None,
        noise: np.ndarray | None = None,
        seed: int | None = None,
    ) -> np.ndarray:
        """Orion's waypoints (B, T, D) float32, read at each prompt's `<ego_wp>` token.

        A model with several modes needs `command` (B,) to pick one. The flow planner samples from `noise`
        (B, T, D) (default: standard normal from a generator seeded with `seed`).
        """
        self._require("orion", action="trajectory")
        state = self.prefill(
            input_ids,
            attention_mask,
            mm_token_type_ids,
            pixel_values,
            image_grid_thw,
            image_embeds,
            scene_queries,
            history_queries,
            can_bus,
            max_new_tokens=0,
        )
        ego_mask = np.asarray(input_ids) == self._token_id("ego")
        per_sample = ego_mask.sum(axis=1)
        if (per_sample != 1).any():
            raise ValueError(f"Each sample needs exactly one <ego_wp> token; input_ids hold {per_sample.tolist()}.")
        feeds: dict[str, Any] = {"ego_features": state.hidden_states[ego_mask]}
        settings = self.manifest["trajectory"]
        batch_size = ego_mask.shape[0]
        if settings["head"] == "flow":
            if noise is None:
                shape = (batch_size, settings["num_waypoints"], settings["waypoint_dim"])
                noise = np.random.default_rng(seed).standard_normal(shape)
            feeds["noise"] = np.asarray(noise, dtype=np.float32)
        modes = self.sessions["trajectory"].run(None, feeds)[0]
        if settings["num_modes"] == 1:
            if command is not None:
                raise ValueError("command selects a trajectory mode, but this model has num_modes=1.")
            return modes[:, 0]
        if command is None:
            raise ValueError(f"command (B,) is required: this model plans num_modes={settings['num_modes']} modes.")
        command = np.asarray(command, dtype=np.int64).reshape(-1)
        if command.shape != (batch_size,) or command.min() < 0 or command.max() >= settings["num_modes"]:
            raise ValueError(
                f"command must hold {batch_size} mode indices in [0, {settings['num_modes']}), got {command.tolist()}."
            )
        return modes[np.arange(batch_size), command]
