"""Text generation on the CPU, engines side by side on one small random Qwen2-VL: ONNX Runtime GenAI on the same
decoder weights, `vlmheads.onnx_export.OnnxVLM` with the fp32, int8 and int4 decoders, PyTorch eager, and PyTorch
with `torch.compile`.

The model is built in code: text hidden 512, 8 layers, 8 attention heads (2 key/value heads, as Qwen2-VL-2B uses
grouped-query attention), intermediate 1536, vocabulary 32,000. `--weights random` keeps the random initialisation
(N(0, 0.02)) and times a prompt of random token ids. `--weights trained` first trains the model briefly in code as a
byte-level language model of English text (the Python documentation topics that ship with CPython,
`pydoc_data.topics`: the first 90 % for training, `--train-steps` AdamW steps), so that its next-token
distributions are peaked like a trained model's rather than nearly flat; its prompts are then held-out text from the
last 10 %. Every engine reads the same prompt (without images Qwen2-VL's M-RoPE positions are the plain 1-D ones,
so ONNX Runtime GenAI runs the same decoder weights as a Qwen2ForCausalLM built by its own model builder).

Per engine (a row), the engines taking turns every round, medians:
- prefill: `generate(max_new_tokens=1)`;
- decode per token: (time with N new tokens - prefill) / (N - 1), with each engine's key/value cache; the same
  from the process CPU time (less sensitive to other jobs on a shared machine, which make a process wait for a core);
- peak RSS: the high-water mark (VmHWM) of a fresh process that loads the engine and generates N tokens (the ONNX
  Runtime engines in a process that never imports torch);
- top-1 agreement with the fp32 ONNX decoder, teacher-forced on its greedy continuation of fixed prompts;
- decode / bandwidth limit: decode per token divided by the time to read the weights a decode step reads once (the
  fp32 rows: the fp32 decoder graph's weights, the layers and the LM head, which all four engines read; the int8 and
  int4 rows: their decoder graphs) at the memory bandwidth of a large NumPy copy on as many threads as the engines
  get (`--threads` equal parts, bytes read + bytes written per second), a run that takes its turn with the engines;
- decode / fp32 MatMuls alone (fp32 rows): decode per token divided by the time ONNX Runtime's MatMul kernel takes
  to read the same weight matrices with nothing else to do (one graph of the fp32 decoder's MatMuls, each on its own
  (1, 1, K) input, in the decoder's order, run N - 1 times back to back as the decode steps are), a run that also
  takes its turn: how far a decode step is from what the kernel attains on this machine, as the bandwidth limit says
  how far it is from the memory (which a step can beat when part of the weights stays in the cache).

    python benchmarks/bench_onnx.py --threads 1 --weights trained
"""

import argparse
import concurrent.futures
import copy
import functools
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2VLConfig, Qwen2VLForConditionalGeneration

from vlmheads.offline.configs import tiny_qwen2_vl_kwargs
from vlmheads.onnx_export import OnnxVLM, export_onnx
from vlmheads.onnx_export.manifest import read_manifest
from vlmheads.onnx_export.quantize import INT4_DECODER, INT8_DECODER, quantize_decoder, token_prompts, top1_agreement

ONNX_ENGINES = {"OnnxVLM fp32": "decoder", "OnnxVLM int8": INT8_DECODER, "OnnxVLM int4": INT4_DECODER}
COPY_BYTES = 256 * 1024**2
COPY_RUN = "memory copy"
MATMULS_RUN = "fp32 MatMuls alone"
# Byte-level text: token id = TEXT_TOKEN_OFFSET + byte, clear of the ids the tiny configurations reserve.
TEXT_TOKEN_OFFSET = 10
TRAIN_FRACTION, TRAIN_WINDOW = 0.9, 32
AGREEMENT_PROMPT_TOKENS, AGREEMENT_POSITIONS = 24, 16


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden-size", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--prompt-tokens", type=int, default=290, help="length of the text prompt")
    parser.add_argument("--new-tokens", type=int, default=32, help="N: tokens generated for the decode timing")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (after one warm-up)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads and ONNX Runtime intra-op threads")
    parser.add_argument("--agreement-prompts", type=int, default=8, help="prompts for the top-1 agreement")
    parser.add_argument("--weights", choices=("random", "trained"), default="random", help="see the docstring")
    parser.add_argument("--train-steps", type=int, default=100, help="AdamW steps of --weights trained")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile row")
    parser.add_argument(
        "--compile-timeout", type=float, default=900, help="seconds torch.compile gets to compile and generate"
    )
    parser.add_argument("--no-genai", action="store_true", help="skip the ONNX Runtime GenAI row")
    parser.add_argument("--out-dir", type=Path, default=None, help="where to export (default: a temporary folder)")
    parser.add_argument("--rss-of", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def small_model(args: argparse.Namespace) -> Qwen2VLForConditionalGeneration:
    """The random Qwen2-VL of the benchmark; it never stops early (no end-of-sequence token)."""
    kwargs = tiny_qwen2_vl_kwargs(args.vocab_size, args.hidden_size, args.layers)
    half_head = args.hidden_size // args.heads // 2
    # Qwen2-VL's split of the rotary dimensions over (temporal, height, width): [16, 24, 24] of 64.
    spatial = 3 * half_head // 8
    kwargs["text_config"].update(
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        intermediate_size=3 * args.hidden_size,
        rope_parameters={"rope_type": "default", "mrope_section": [half_head - 2 * spatial, spatial, spatial]},
        eos_token_id=None,
    )
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(Qwen2VLConfig(**kwargs)).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def text_corpus() -> tuple[np.ndarray, np.ndarray]:
    """Byte-level token ids of CPython's documentation topics: (training part, held-out part)."""
    from pydoc_data.topics import topics

    data = "\n".join(topics[key] for key in sorted(topics)).encode()
    ids = np.frombuffer(data, dtype=np.uint8).astype(np.int64) + TEXT_TOKEN_OFFSET
    split = int(len(ids) * TRAIN_FRACTION)
    return ids[:split], ids[split:]


def train_briefly(model: Qwen2VLForConditionalGeneration, args: argparse.Namespace) -> list[float]:
    """Trains `model` in place as a byte-level language model on the training part of `text_corpus`:
    `args.train_steps` AdamW steps (learning rate 3e-3, 10 warm-up steps, cosine decay, gradients clipped to 1) on
    batches of 8 windows of 32 tokens drawn with a fixed seed. Returns the loss of every step."""
    train, _ = text_corpus()
    generator = np.random.default_rng(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    warmup = 10
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: (
            min(1.0, (step + 1) / warmup)
            * 0.5
            * (1 + math.cos(math.pi * min(step, args.train_steps) / max(args.train_steps, 1)))
        ),
    )
    model.train()
    losses = []
    for step in range(args.train_steps):
        starts = generator.integers(0, len(train) - TRAIN_WINDOW, 8)
        batch = torch.from_numpy(np.stack([train[start : start + TRAIN_WINDOW] for start in starts]))
        # transformers shifts the labels: each position learns the next byte.
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if (step + 1) % 25 == 0:
            print(f"training step {step + 1}/{args.train_steps}: loss {losses[-1]:.3f}", flush=True)
    model.eval()
    return losses


def held_out_prompts(count: int, length: int, offset: int = 0) -> list[np.ndarray]:
    """`count` prompts (1, length) of held-out text, evenly spaced through the held-out part of `text_corpus`."""
    _, held_out = text_corpus()
    stride = (len(held_out) - length) // max(count, 1)
    return [held_out[offset + i * stride : offset + i * stride + length][None] for i in range(count)]


def language_model_folder(model: Qwen2VLForConditionalGeneration, folder: Path) -> Path:
    """Saves `model`'s decoder and LM head as a Qwen2ForCausalLM (the same weights) for GenAI's model builder."""
    text = model.config.text_config
    config = Qwen2Config(
        vocab_size=text.vocab_size,
        hidden_size=text.hidden_size,
        intermediate_size=text.intermediate_size,
        num_hidden_layers=text.num_hidden_layers,
        num_attention_heads=text.num_attention_heads,
        num_key_value_heads=text.num_key_value_heads,
        max_position_embeddings=text.max_position_embeddings,
        rms_norm_eps=text.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": text.rope_parameters["rope_theta"]},
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=None,
        pad_token_id=0,
    )
    language_model = Qwen2ForCausalLM(config).eval()
    language_model.model.load_state_dict(model.model.language_model.state_dict())
    language_model.lm_head.load_state_dict(model.lm_head.state_dict())
    language_model.save_pretrained(folder)
    return folder


def build_genai(model: Qwen2VLForConditionalGeneration, work: Path, threads: int) -> Path:
    """The ONNX Runtime GenAI model builder's fp32 CPU model of `model`'s decoder, in `work/genai`, set to run on
    `threads` intra-op threads like the other engines."""
    source = language_model_folder(model, work / "qwen2_causal_lm")
    target = work / "genai"
    command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(source), "-o", str(target)]
    run = subprocess.run([*command, "-p", "fp32", "-e", "cpu"], capture_output=True, text=True, timeout=1800)
    if run.returncode != 0:
        raise RuntimeError(f"GenAI's model builder failed: {run.stderr[-2000:]}")
    config_path = target / "genai_config.json"
    config = json.loads(config_path.read_text())
    config["model"]["decoder"]["session_options"].update(intra_op_num_threads=threads, inter_op_num_threads=1)
    config_path.write_text(json.dumps(config, indent=2))
    return target


class GenAIEngine:
    """Greedy generation and teacher-forced top-1 with ONNX Runtime GenAI on `folder`."""

    def __init__(self, folder: Path, vocab_size: int):
        import onnxruntime_genai as og

        self.og = og
        config = og.Config(str(folder))
        config.clear_providers()
        self.model = og.Model(config)
        self.vocab_size = vocab_size

    def _generator(self, max_length: int):
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(do_sample=False, max_length=max_length, batch_size=1)
        return self.og.Generator(self.model, params)

    def generate(self, input_ids: np.ndarray, new_tokens: int) -> np.ndarray:
        generator = self._generator(input_ids.shape[1] + new_tokens)
        generator.append_tokens(input_ids.astype(np.int32))
        for _ in range(new_tokens):
            generator.generate_next_token()
        return np.asarray(generator.get_sequence(0))[None]

    def top1(self, input_ids: np.ndarray, continuation: np.ndarray) -> np.ndarray:
        """Argmax of the next-token logits after the prompt and after each continuation token but the last."""
        generator = self._generator(input_ids.shape[1] + len(continuation))
        generator.append_tokens(input_ids.astype(np.int32))
        tops = []
        for token in continuation:
            tops.append(int(np.asarray(generator.get_logits()).reshape(-1, self.vocab_size)[-1].argmax()))
            generator.append_tokens(np.array([[token]], dtype=np.int32))
        return np.array(tops)


def interleaved_medians(
    runs: dict[str, Callable[[], object]], repeats: int
) -> tuple[dict[str, float], dict[str, float]]:
    """Median seconds of each run, wall-clock and process CPU time. After one warm-up each, the runs take turns,
    `repeats` rounds, so that a CPU shared with other work slows all of them alike; the CPU time leaves out the time
    the process waited for a core."""
    times = {name: [] for name in runs}
    cpu_times = {name: [] for name in runs}
    for run in runs.values():
        run()
    for _ in range(repeats):
        for name, run in runs.items():
            start, cpu_start = time.perf_counter(), time.process_time()
            run()
            times[name].append(time.perf_counter() - start)
            cpu_times[name].append(time.process_time() - cpu_start)
    medians = {name: statistics.median(values) for name, values in times.items()}
    return medians, {name: statistics.median(values) for name, values in cpu_times.items()}


def weights_read(engine: str) -> str:
    """The decoder graph whose weights a decode step of `engine` reads: its own for the int8 and int4 rows, the fp32
    decoder's for every fp32 engine (GenAI, OnnxVLM, PyTorch)."""
    return ONNX_ENGINES.get(engine, "decoder")


def graph_bytes(out_dir: Path, graph: str) -> int:
    """Bytes of a manifest graph's files: what a decode step reads at least once."""
    entry = read_manifest(out_dir, verify_checksums=False)["graphs"][graph]
    return sum((out_dir / name).stat().st_size for name in [entry["file"], *entry["external_data"]])


def parallel_copy(target: np.ndarray, source: np.ndarray, threads: int) -> Callable[[], None]:
    """A copy of the 1-D `source` into `target` in `threads` equal parts copied at once (NumPy leaves the GIL while
    it copies): what the engines' threads together can move."""
    parts = list(zip(np.array_split(target, threads), np.array_split(source, threads), strict=True))
    pool = concurrent.futures.ThreadPoolExecutor(threads)

    def copy() -> None:
        for future in [pool.submit(np.copyto, *part) for part in parts]:
            future.result()

    return copy


def matmuls_alone(out_dir: Path, threads: int, passes: int) -> Callable[[], None]:
    """`passes` runs of the fp32 decoder's weight MatMuls and nothing else: one graph holding each MatMul whose weight
    is a 2-D initializer, in the decoder's order, each fed its own (1, 1, K) input (one decode step's weight reads).
    Run back to back as the decode steps are, so that the share of the weights a step finds still in the cache is
    the same as theirs."""
    decoder = onnx.load(out_dir / read_manifest(out_dir, verify_checksums=False)["graphs"]["decoder"]["file"])
    weights = {tensor.name: tensor for tensor in decoder.graph.initializer if len(tensor.dims) == 2}
    nodes, inputs, outputs, initializers, feeds = [], [], [], [], {}
    for node in decoder.graph.node:
        if node.op_type != "MatMul" or node.input[1] not in weights:
            continue
        weight = weights[node.input[1]]
        index = len(nodes)
        inputs.append(onnx.helper.make_tensor_value_info(f"x{index}", weight.data_type, [1, 1, weight.dims[0]]))
        outputs.append(onnx.helper.make_tensor_value_info(f"y{index}", weight.data_type, None))
        nodes.append(onnx.helper.make_node("MatMul", [f"x{index}", weight.name], [f"y{index}"]))
        initializers.append(weight)
        feeds[f"x{index}"] = np.ones((1, 1, weight.dims[0]), dtype=np.float32)
    graph = onnx.helper.make_graph(nodes, MATMULS_RUN, inputs, outputs, initializers)
    model = onnx.helper.make_model(graph, opset_imports=decoder.opset_import, ir_version=decoder.ir_version)
    session = ort.InferenceSession(
        model.SerializeToString(), session_options(threads), providers=["CPUExecutionProvider"]
    )

    def run() -> None:
        for _ in range(passes):
            session.run(None, feeds)

    return run


def session_options(threads: int) -> ort.SessionOptions:
    """One intra-op thread per session, or, with more, the process's shared pool (`share_thread_pool`)."""
    options = ort.SessionOptions()
    if threads > 1:
        options.use_per_session_threads = False
    else:
        options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return options


def share_thread_pool(threads: int) -> None:
    """With more than one thread, the ONNX Runtime sessions of this process (three hosts of two sessions each and
    the MatMuls-alone run) share one global pool of `threads` intra-op threads, as ONNX Runtime advises for several
    sessions in one process: with a pool each, the idle pools' spinning workers take cores from the running one. Must
    run before the first session is created."""
    if threads > 1:
        ort.set_global_thread_pool_sizes(threads, 1)


# Peak RSS of the ONNX Runtime engines, measured where torch is never imported (as a deployment would run them).
ONNX_RSS_SCRIPT = """
import json, sys
# As on a host without them: importing vlmheads would otherwise pull in transformers and, through it, torch.
sys.modules["torch"] = None
sys.modules["transformers"] = None
from pathlib import Path
import numpy as np
import onnxruntime as ort
work, engine, graph = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
threads, new_tokens = int(sys.argv[4]), int(sys.argv[5])
prompt = np.load(work / "prompt.npy")
if engine == "GenAI fp32":
    import onnxruntime_genai as og
    model = og.Model(str(work / "genai"))
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=prompt.shape[1] + new_tokens, batch_size=1)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt.astype(np.int32))
    for _ in range(new_tokens):
        generator.generate_next_token()
else:
    from vlmheads.onnx_export import OnnxVLM
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    OnnxVLM(work / "onnx", session_options=options, decoder=graph).generate(prompt, max_new_tokens=new_tokens)
status = Path("/proc/self/status").read_text()
print(json.dumps({"peak_rss_bytes": 1024 * int(status.split("VmHWM:")[1].split()[0])}))
"""


def measure_torch_rss(engine: str, work: Path, args: argparse.Namespace) -> None:
    """In a fresh process: load the saved model (compiled for the torch.compile row), generate N tokens after the
    prompt, print the peak RSS in bytes."""
    torch.set_num_threads(args.threads)
    prompt = np.load(work / "prompt.npy")
    model = Qwen2VLForConditionalGeneration.from_pretrained(work / "torch").eval()
    if engine == "PyTorch torch.compile":
        model.forward = torch.compile(model.forward, dynamic=True)
    with torch.no_grad():
        model.generate(torch.from_numpy(prompt), max_new_tokens=args.new_tokens, do_sample=False)
    status = Path("/proc/self/status").read_text()
    print(json.dumps({"peak_rss_bytes": 1024 * int(status.split("VmHWM:")[1].split()[0])}))


def peak_rss(
    engine: str, work: Path, argv: list[str], args: argparse.Namespace, timeout: float = 1800
) -> float | None:
    """Peak RSS (bytes) of a fresh process that loads `engine` and generates N tokens; None if it failed or took
    longer than `timeout` seconds."""
    if engine in ONNX_ENGINES or engine == "GenAI fp32":
        graph = ONNX_ENGINES.get(engine, "")
        command = ["-c", ONNX_RSS_SCRIPT, str(work), engine, graph, str(args.threads), str(args.new_tokens)]
    else:
        command = [__file__, *argv, "--rss-of", engine, "--out-dir", str(work)]
    try:
        run = subprocess.run([sys.executable, *command], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"peak RSS of {engine} not measured: no result within {timeout:.0f} s")
        return None
    if run.returncode != 0:
        print(f"peak RSS of {engine} not measured: {run.stderr.strip().splitlines()[-1:]}")
        return None
    return json.loads(run.stdout.strip().splitlines()[-1])["peak_rss_bytes"]


def torch_top1(model: torch.nn.Module, prompt: np.ndarray, continuation: np.ndarray) -> np.ndarray:
    """Teacher-forced argmax of `model` at the prompt's last position and each continuation token but the last."""
    sequence = torch.from_numpy(np.concatenate([prompt[0], continuation[:-1]])[None])
    with torch.no_grad():
        logits = model(input_ids=sequence).logits[0, prompt.shape[1] - 1 :]
    return logits.argmax(-1).numpy()


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.rss_of is not None:
        measure_torch_rss(args.rss_of, args.out_dir, args)
        return
    if args.new_tokens < 2:
        raise ValueError(f"--new-tokens must be at least 2 to time decoding, got {args.new_tokens}.")
    if args.weights == "trained" and args.vocab_size <= TEXT_TOKEN_OFFSET + 255:
        raise ValueError(
            f"--weights trained reads bytes as token ids {TEXT_TOKEN_OFFSET}-{TEXT_TOKEN_OFFSET + 255}: "
            f"--vocab-size must be above {TEXT_TOKEN_OFFSET + 255}, got {args.vocab_size}."
        )
    torch.set_num_threads(args.threads)
    share_thread_pool(args.threads)
    scratch = tempfile.TemporaryDirectory()
    work = args.out_dir or Path(scratch.name)
    work.mkdir(parents=True, exist_ok=True)
    model = small_model(args)
    notes = []
    if args.weights == "trained":
        start = time.perf_counter()
        losses = train_briefly(model, args)
        notes.append(
            f"trained {args.train_steps} steps in {time.perf_counter() - start:.0f} s: loss {losses[0]:.2f} -> "
            f"{statistics.mean(losses[-10:]):.2f} (mean of the last 10 steps)"
        )
    model.save_pretrained(work / "torch")
    prompt = token_prompt(args)
    np.save(work / "prompt.npy", prompt)
    start = time.perf_counter()
    export_onnx(model, None, work / "onnx", include_vision=False)
    quantize_decoder(work / "onnx", bits=8)
    quantize_decoder(work / "onnx", bits=4, block_size=32, accuracy_level=4)
    export_seconds = time.perf_counter() - start
    out_dir = work / "onnx"

    engines: dict[str, Callable[[int], object]] = {}
    top1: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {}
    if not args.no_genai:
        try:
            genai = GenAIEngine(build_genai(model, work, args.threads), args.vocab_size)
            engines["GenAI fp32"] = functools.partial(genai.generate, prompt)
            top1["GenAI fp32"] = genai.top1
        except (ImportError, RuntimeError) as error:
            notes.append(f"GenAI row skipped: {error}")
    hosts = {
        name: OnnxVLM(out_dir, session_options=session_options(args.threads), decoder=graph)
        for name, graph in ONNX_ENGINES.items()
    }
    for name, host in hosts.items():
        engines[name] = functools.partial(lambda host, n: host.generate(prompt, max_new_tokens=n), host)

    def torch_generate(module: torch.nn.Module, new_tokens: int) -> torch.Tensor:
        with torch.no_grad():
            return module.generate(torch.from_numpy(prompt), max_new_tokens=new_tokens, do_sample=False)

    engines["PyTorch eager"] = functools.partial(torch_generate, model)
    top1["PyTorch eager"] = functools.partial(torch_top1, model)
    compile_rss = None
    if not args.no_compile:
        # First in a fresh process with a time limit (it also fills inductor's on-disk cache for the copy below).
        compile_rss = peak_rss("PyTorch torch.compile", work, argv, args, timeout=args.compile_timeout)
        if compile_rss is None:
            notes.append(f"torch.compile row skipped: no result within {args.compile_timeout:.0f} s (see above)")
    if compile_rss is not None:
        compiled = copy.deepcopy(model)
        compiled.forward = torch.compile(compiled.forward, dynamic=True)
        try:
            torch_generate(compiled, 2)
            engines["PyTorch torch.compile"] = functools.partial(torch_generate, compiled)
            top1["PyTorch torch.compile"] = functools.partial(torch_top1, compiled)
        except Exception as error:  # noqa: BLE001 - any compiler failure leaves the row out, said in the notes
            notes.append(f"torch.compile row skipped: {type(error).__name__}: {str(error).splitlines()[0][:200]}")

    reference = hosts["OnnxVLM fp32"].generate(prompt, max_new_tokens=args.new_tokens)
    same_tokens = {
        name: bool(np.array_equal(np.asarray(run(args.new_tokens)), reference)) for name, run in engines.items()
    }
    runs = {}
    for name, run in engines.items():
        runs[f"{name} prefill"] = functools.partial(run, 1)
        runs[f"{name} total"] = functools.partial(run, args.new_tokens)
    runs[COPY_RUN] = parallel_copy(np.empty(COPY_BYTES // 8), np.ones(COPY_BYTES // 8), args.threads)
    runs[MATMULS_RUN] = matmuls_alone(out_dir, args.threads, passes=args.new_tokens - 1)
    medians, cpu_medians = interleaved_medians(runs, args.repeats)
    bandwidth = 2 * COPY_BYTES / medians[COPY_RUN]

    if args.weights == "trained":
        prompts = [{"input_ids": ids} for ids in held_out_prompts(args.agreement_prompts, AGREEMENT_PROMPT_TOKENS)]
    else:
        prompts = token_prompts(out_dir, num_prompts=args.agreement_prompts, length=AGREEMENT_PROMPT_TOKENS)
    positions = AGREEMENT_POSITIONS
    agreement = {"OnnxVLM fp32": 1.0}
    for name, graph in ONNX_ENGINES.items():
        if graph != "decoder":
            agreement[name] = top1_agreement(
                out_dir, prompts, positions, decoder=graph, session_options=session_options(args.threads)
            )
    for name, score in top1.items():
        hits = total = 0
        for item in prompts:
            continuation = hosts["OnnxVLM fp32"].generate(item["input_ids"], max_new_tokens=positions)[
                0, AGREEMENT_PROMPT_TOKENS:
            ]
            hits += int((score(item["input_ids"], continuation) == continuation).sum())
            total += positions
        agreement[name] = hits / total
    # GenAI's own file also holds the embedding table, of which a step reads one row: it counts the fp32 decoder's.
    weight_bytes = {
        name: graph_bytes(out_dir, weights_read(name)) for name in [*engines, "GenAI fp32", "PyTorch torch.compile"]
    }
    rss = {
        name: compile_rss if name == "PyTorch torch.compile" else peak_rss(name, work, argv, args) for name in engines
    }

    text = model.config.text_config
    print(
        f"Qwen2-VL decoder, {args.weights} weights: hidden {text.hidden_size}, {text.num_hidden_layers} layers, "
        f"{text.num_attention_heads} heads ({text.num_key_value_heads} kv), intermediate {text.intermediate_size}, "
        f"vocab {text.vocab_size}; text prompt {prompt.shape[1]} tokens, N = {args.new_tokens} new tokens, "
        f"{args.threads} thread(s), {os.cpu_count()} CPUs, median of {args.repeats}, "
        f"load average {' '.join(f'{load:.1f}' for load in os.getloadavg())} at the end; torch {torch.__version__}, "
        f"onnxruntime {ort.__version__}; export and quantization {export_seconds:.0f} s; copy bandwidth "
        f"{bandwidth / 1e9:.1f} GB/s"
    )
    header = [
        "engine",
        "prefill (ms)",
        "decode (ms/token)",
        "decode CPU time (ms/token)",
        "decode vs PyTorch eager",
        "peak RSS (MB)",
        "top-1 agreement",
        "decode / bandwidth limit",
        "decode / fp32 MatMuls alone",
        "same tokens as fp32",
    ]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    matmuls = medians[MATMULS_RUN] / (args.new_tokens - 1)
    eager_decode = (medians["PyTorch eager total"] - medians["PyTorch eager prefill"]) / (args.new_tokens - 1)
    for name in engines:
        prefill = medians[f"{name} prefill"]
        decode = (medians[f"{name} total"] - prefill) / (args.new_tokens - 1)
        decode_cpu = (cpu_medians[f"{name} total"] - cpu_medians[f"{name} prefill"]) / (args.new_tokens - 1)
        limit = weight_bytes[name] / bandwidth
        cells = [
            name,
            f"{1000 * prefill:.1f}",
            f"{1000 * decode:.2f}",
            f"{1000 * decode_cpu:.2f}",
            f"{eager_decode / decode:.2f}x",
            "n/a" if rss[name] is None else f"{rss[name] / 1e6:.0f}",
            f"{agreement[name]:.3f}",
            f"{decode / limit:.2f} ({weight_bytes[name] / 1e6:.0f} MB)",
            f"{decode / matmuls:.2f}" if weights_read(name) == "decoder" else "-",
            str(same_tokens[name]),
        ]
        print("| " + " | ".join(cells) + " |")
    print(
        f"fp32 MatMuls alone: {1000 * matmuls:.2f} ms per step "
        f"({1000 * cpu_medians[MATMULS_RUN] / (args.new_tokens - 1):.2f} ms CPU time), "
        f"{matmuls * bandwidth / weight_bytes['OnnxVLM fp32']:.2f}x the bandwidth limit"
    )
    print(
        f"top-1 agreement: {args.agreement_prompts} prompts x {positions} positions, teacher-forced on the fp32 "
        "OnnxVLM greedy continuation"
    )
    for note in notes:
        print(note)
    scratch.cleanup()


def token_prompt(args: argparse.Namespace) -> np.ndarray:
    """The benchmark's timed prompt (1, prompt_tokens): fixed random ids above the special ones (random weights) or
    held-out text (trained weights)."""
    if args.weights == "trained":
        return held_out_prompts(1, args.prompt_tokens, offset=len(text_corpus()[1]) // 3)[0]
    return np.random.default_rng(1).integers(10, args.vocab_size, (1, args.prompt_tokens)).astype(np.int64)


if __name__ == "__main__":
    main()
