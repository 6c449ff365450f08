"""Throughput and latency of the single-process server (`python -m vlmheads.serve`, LocalEngine) on the CPU.

The server runs in a subprocess on one torch thread, serving the embedded tiny Orion model (or `--model DIR`).
Three runs over HTTP, with greedy decoding:

1. one client at a time: `requests` chat requests of `max_tokens` tokens, one after the other;
2. `clients` concurrent clients sending the same requests: the aggregate completion tokens/s, whose ratio to (1) is
   the gain of continuous batching;
3. a load test: `clients` concurrent clients send `load_requests` mixed requests (plain and streamed, some with an
   image, 1-8 tokens): the server's p50 / p99 latency and the count of 5xx answers.

With `--hostile_seconds S`, a hostile load run follows: `hostile_clients` clients for S seconds, a quarter of the
streams abandoned after their first token, and one client sending bad inputs throughout (malformed and out-of-range
bodies, oversized images, non-finite driving values); the 5xx answers to good and to bad requests, and the server's
RSS before and after. With `--image_memory`, a server that admits 4096x4096 images decodes six concurrent requests
of four 4096x4096 RGBA PNGs; its RSS before, at the peak and after. With `--structured_output`, the server's time
between tokens of requests with a `guided_regex` and with a `json_schema` beside unconstrained ones. With
`--prefix_cache`, the time to first token of prompts opening with `prefix_tokens` tokens of their own, each sent
twice in a row (uncached, then from the prefix cache) with both answers compared, beside the same on a server whose
prefix cache is off. `--only` skips runs 1-3.

    python benchmarks/bench_serve.py                      # the BENCHMARKS.md configuration
    python benchmarks/bench_serve.py --hostile_seconds 60 --hostile_clients 64 --image_memory --structured_output
    python benchmarks/bench_serve.py --only --prefix_cache --structured_output
    python benchmarks/bench_serve.py --model outputs/orion_demo
"""

import base64
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import httpx
import numpy as np
import torch
from PIL import Image
from transformers import HfArgumentParser


@dataclass
class BenchmarkArguments:
    model: str | None = field(
        default=None, metadata={"help": "A saved model folder; the embedded tiny model if unset."}
    )
    real_width: bool = field(
        default=False,
        metadata={
            "help": "Serve the embedded Orion model at Qwen2-VL-2B-Instruct's text widths (its public config: hidden "
            "1536, 12 heads, 2 key/value heads, MLP 8960) with 2 decoder layers, saved to a temporary folder."
        },
    )
    clients: int = field(default=16, metadata={"help": "Concurrent clients."})
    requests: int = field(default=32, metadata={"help": "Requests of the throughput runs."})
    max_tokens: int = field(default=32, metadata={"help": "Completion tokens per throughput request."})
    load_requests: int = field(default=200, metadata={"help": "Requests of the load test."})
    max_batch_size: int = field(default=16)
    hostile_seconds: float = field(default=0.0, metadata={"help": "Length of the hostile load run (0: none)."})
    hostile_clients: int = field(default=64, metadata={"help": "Clients of the hostile load run."})
    image_memory: bool = field(default=False, metadata={"help": "Measure RSS around six 4x4096^2 RGBA requests."})
    structured_output: bool = field(
        default=False, metadata={"help": "Time per token with a guided_regex beside unconstrained requests."}
    )
    prefix_cache: bool = field(
        default=False, metadata={"help": "Time to first token of repeated long-prefix prompts, cached and not."}
    )
    prefix_tokens: int = field(default=256, metadata={"help": "Tokens of the prompts' own prefix (--prefix_cache)."})
    only: bool = field(
        default=False, metadata={"help": "Skip the throughput and load runs: only the runs the flags ask for."}
    )


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(args: BenchmarkArguments, *extra: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-m", "vlmheads.serve", "--port", str(port), "--threads", "1", "--log-level", "warning"]
    command += ["--max-batch-size", str(args.max_batch_size), *extra]
    if args.model is not None:
        command += ["--model", args.model]
    process = subprocess.Popen(command, env={**os.environ, "OMP_NUM_THREADS": "1"})
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"The server exited with {process.returncode}.")
        try:
            if httpx.get(f"{base_url}/health", timeout=1).status_code == 200:
                return process, base_url
        except httpx.TransportError:
            time.sleep(0.2)
    process.kill()
    raise TimeoutError("The server did not start within 900 s.")


def camera_url(seed: int) -> str:
    pixels = np.random.default_rng(seed).integers(0, 256, (56, 56, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return f"data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}"


def chat_request(index: int, max_tokens: int, image: bool, stream: bool) -> dict:
    content = [{"type": "text", "text": f"Request {index}: describe the road " + "ahead " * (index % 7)}]
    if image:
        content.insert(0, {"type": "image_url", "image_url": {"url": camera_url(index)}})
    return {
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
        "stream_options": {"include_usage": True} if stream else None,
    }


def send(http: httpx.Client, base_url: str, body: dict) -> tuple[int, int, float]:
    """(HTTP status, completion tokens, latency in seconds) of one request."""
    start = time.perf_counter()
    if body["stream"]:
        tokens = 0
        with http.stream("POST", f"{base_url}/v1/chat/completions", json=body) as response:
            for line in response.iter_lines():
                if '"usage":{' in line:
                    tokens = int(line.split('"completion_tokens":')[1].split(",")[0])
        return response.status_code, tokens, time.perf_counter() - start
    response = http.post(f"{base_url}/v1/chat/completions", json=body)
    tokens = response.json().get("usage", {}).get("completion_tokens", 0) if response.status_code == 200 else 0
    return response.status_code, tokens, time.perf_counter() - start


def run_requests(base_url: str, bodies: list[dict], clients: int) -> tuple[list[tuple[int, int, float]], float]:
    """Results of `bodies` sent by `clients` concurrent clients, and the wall time of the whole run."""
    clients_by_thread: dict[int, httpx.Client] = {}

    def one(body: dict) -> tuple[int, int, float]:
        thread = threading.get_ident()
        if thread not in clients_by_thread:
            clients_by_thread[thread] = httpx.Client(timeout=300)
        return send(clients_by_thread[thread], base_url, body)

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, bodies))
    wall = time.perf_counter() - start
    for http in clients_by_thread.values():
        http.close()
    return results, wall


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def real_width_folder(out_dir: str) -> str:
    """Saves the embedded model's architecture at Qwen2-VL-2B-Instruct's text widths (random weights, 2 decoder
    layers, the tiny vision tower widened to the text width its merger feeds) with its processor into `out_dir`."""
    from vlmheads import OrionQwenConfig, OrionQwenForTrajectory
    from vlmheads.offline import tiny_orion_processor
    from vlmheads.offline.configs import public_config, tiny_qwen2_vl_kwargs
    from vlmheads.serve.models import EMBEDDED_HISTORY_QUERIES, EMBEDDED_SCENE_QUERIES

    real = public_config("Qwen/Qwen2-VL-2B-Instruct")
    processor = tiny_orion_processor(
        num_scene_queries=EMBEDDED_SCENE_QUERIES, num_history_queries=EMBEDDED_HISTORY_QUERIES
    )
    kwargs = tiny_qwen2_vl_kwargs(len(processor.tokenizer))
    widths = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads")
    kwargs["text_config"].update({name: real[name] for name in widths})
    kwargs["text_config"]["rope_parameters"] = {
        "rope_type": "default",
        "rope_theta": real["rope_theta"],
        "mrope_section": real["rope_scaling"]["mrope_section"],
    }
    kwargs["vision_config"]["hidden_size"] = real["hidden_size"]
    torch.manual_seed(0)
    model = OrionQwenForTrajectory(OrionQwenConfig(**kwargs, **processor.model_config_kwargs())).eval()
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


def main() -> None:
    (args,) = HfArgumentParser(BenchmarkArguments).parse_args_into_dataclasses()
    if args.real_width:
        if args.model is not None:
            raise ValueError("Give --model or --real_width, not both.")
        with tempfile.TemporaryDirectory(prefix="bench-serve-") as folder:
            args.model = real_width_folder(folder)
            run(args)
    else:
        run(args)


def run(args: BenchmarkArguments) -> None:
    if not args.only:
        throughput_and_load(args)
    if args.hostile_seconds > 0:
        hostile_load(args)
    if args.image_memory:
        image_memory(args)
    if args.structured_output:
        structured_output(args)
    if args.prefix_cache:
        prefix_cache(args)


def throughput_and_load(args: BenchmarkArguments) -> None:
    """Runs 1 and 2 (throughput one at a time and with `clients` clients), and run 3 (the load test)."""
    process, base_url = start_server(args)
    try:
        model_id = httpx.get(f"{base_url}/v1/models").json()["data"][0]["id"]
        warmup = [chat_request(index, 4, image=index % 2 == 0, stream=False) for index in range(4)]
        run_requests(base_url, warmup, 4)
        bodies = [chat_request(index, args.max_tokens, image=False, stream=False) for index in range(args.requests)]
        sequential, sequential_wall = run_requests(base_url, bodies, 1)
        concurrent, concurrent_wall = run_requests(base_url, bodies, args.clients)
        load_bodies = [
            chat_request(index, 1 + index % 8, image=index % 4 == 0, stream=index % 3 == 0)
            for index in range(args.load_requests)
        ]
        load, load_wall = run_requests(base_url, load_bodies, args.clients)
    finally:
        process.terminate()
        process.wait(60)

    def tokens_per_second(results: list[tuple[int, int, float]], wall: float) -> float:
        return sum(tokens for _, tokens, _ in results) / wall

    single = tokens_per_second(sequential, sequential_wall)
    batched = tokens_per_second(concurrent, concurrent_wall)
    latencies = [latency for _, _, latency in load]
    print(f"Server: python -m vlmheads.serve ({model_id}), CPU, 1 torch thread, max batch {args.max_batch_size}")
    print(f"Throughput: {args.requests} greedy requests of up to {args.max_tokens} tokens")
    print()
    print("| clients | completion tokens | wall [s] | tokens/s |")
    print("|---|---|---|---|")
    for clients, results, wall in ((1, sequential, sequential_wall), (args.clients, concurrent, concurrent_wall)):
        tokens = sum(tokens for _, tokens, _ in results)
        print(f"| {clients} | {tokens} | {wall:.2f} | {tokens / wall:.1f} |")
    print()
    print(f"batching gain ({args.clients} clients / 1 client, tokens/s): {batched / single:.2f}x")
    print()
    statuses = [status for status, _, _ in load]
    print(
        f"Load test: {args.clients} clients, {args.load_requests} requests "
        "(1-8 tokens, 1/4 with an image, 1/3 streamed)"
    )
    print()
    print("| answered | 5xx | other errors | wall [s] | requests/s | p50 latency [ms] | p99 latency [ms] |")
    print("|---|---|---|---|---|---|---|")
    server_errors = sum(status >= 500 for status in statuses)
    other_errors = sum(400 <= status < 500 for status in statuses)
    print(
        f"| {sum(status == 200 for status in statuses)} | {server_errors} | {other_errors} | {load_wall:.2f} | "
        f"{len(load) / load_wall:.1f} | {statistics.median(latencies) * 1000:.0f} | "
        f"{percentile(latencies, 0.99) * 1000:.0f} |"
    )


PREFIX_WORDS = "the road ahead is clear and a car turns left at the next light while we keep our lane".split()


def prefix_request(index: int, prefix_tokens: int, question: str = "what should the car do next?") -> dict:
    """A streamed greedy request of 8 tokens whose prompt opens with about `prefix_tokens` tokens of its own, a
    system message (`index` picks the words, and its first block holds the index: common English words are one Qwen
    token each), then the user's `question`."""
    words = [PREFIX_WORDS[(index * 7 + position * (1 + index % 5)) % len(PREFIX_WORDS)] for position in range(9999)]
    context = f"Trip {index}: " + " ".join(words[: prefix_tokens - 8])
    messages = [{"role": "system", "content": context}, {"role": "user", "content": f"Question: {question}"}]
    return {
        "messages": messages,
        "max_tokens": 8,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def first_token(http: httpx.Client, base_url: str, body: dict) -> tuple[float, tuple[str, int]]:
    """(seconds to the first chunk after the role chunk, (the answer's text, its completion tokens)) of a streamed
    request."""
    start = time.perf_counter()
    seconds, text, usage, chunks = None, "", {}, 0
    with http.stream("POST", f"{base_url}/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {response.read()!r}")
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunks += 1
            if chunks == 2:
                seconds = time.perf_counter() - start
            chunk = json.loads(line[len("data: ") :])
            usage = chunk.get("usage") or usage
            text += "".join(choice["delta"].get("content") or "" for choice in chunk["choices"])
    return seconds, (text, usage["completion_tokens"])


PREFIX_CASES = ("first", "repeated", "shared prefix")


def prefix_cache(args: BenchmarkArguments) -> None:
    """Per round, one request at a time: a prompt with a new `prefix_tokens`-token prefix (first: a miss), the same
    prompt again (repeated: the whole prompt's cache and first logits are reused), and the same prefix with another
    question (shared prefix: every whole 16-token block of the prefix is reused, the rest runs). Median time to first
    token of each (to the first chunk after the role chunk). A second server, whose prefix cache is off, runs beside
    it: each request goes to both, one after the other (which goes first alternates by round), so that both see the
    same load; its answers are the uncached ones that the cached ones must equal (text and token count)."""
    servers = {"on": start_server(args, "--prefix-cache-entries", "8")}
    ttft: dict[str, dict[str, list[float]]] = {server: {case: [] for case in PREFIX_CASES} for server in ("on", "off")}
    answers: dict[tuple[str, str, int], tuple[str, int]] = {}
    try:
        servers["off"] = start_server(args, "--prefix-cache-entries", "0")
        with httpx.Client(timeout=300) as http:
            for index in range(args.requests + 2):
                bodies = [prefix_request(index, args.prefix_tokens)] * 2
                bodies.append(prefix_request(index, args.prefix_tokens, "is the lane to the left free?"))
                for case, body in zip(PREFIX_CASES, bodies, strict=True):
                    for server in ("on", "off") if index % 2 else ("off", "on"):
                        seconds, answers[server, case, index] = first_token(http, servers[server][1], body)
                        if index >= 2:  # the first rounds warm the servers up
                            ttft[server][case].append(seconds)
            plain = {**bodies[0], "stream": False, "stream_options": None}
            prompt_tokens = http.post(f"{servers['on'][1]}/v1/chat/completions", json=plain).json()["usage"]
    finally:
        for process, _ in servers.values():
            process.terminate()
            process.wait(60)
    rounds = range(2, args.requests + 2)
    print()
    print(
        f"Prefix cache: {args.requests} rounds, one request at a time, of a prompt with its own "
        f"{args.prefix_tokens}-token prefix ({prompt_tokens['prompt_tokens']} prompt tokens), the same again, and the "
        "same prefix with another question; greedy, 8 tokens, streamed; each request also sent to a cache-off server"
    )
    print()
    print("| request | TTFT, cache on [ms] | / first | TTFT, cache off [ms] | / first | answers equal uncached |")
    print("|---|---|---|---|---|---|")
    medians = {server: {case: statistics.median(ttft[server][case]) for case in PREFIX_CASES} for server in ttft}
    for case in PREFIX_CASES:
        equal = sum(answers["on", case, index] == answers["off", case, index] for index in rounds)
        on, off = medians["on"], medians["off"]
        print(
            f"| {case} | {on[case] * 1000:.2f} | {on[case] / on['first']:.2f}x | {off[case] * 1000:.2f} | "
            f"{off[case] / off['first']:.2f}x | {equal}/{args.requests} |"
        )


def inter_token_totals(http: httpx.Client, base_url: str) -> tuple[float, float]:
    """(sum of seconds, count) of the server's inter-token latency histogram (GET /metrics)."""
    totals = {}
    for line in http.get(f"{base_url}/metrics").text.splitlines():
        for part in ("sum", "count"):
            if line.startswith(f"vlmheads:inter_token_latency_seconds_{part} "):
                totals[part] = float(line.split()[1])
    return totals["sum"], totals["count"]


SAMPLED = {"temperature": 1.0, "seed": 0}
STRUCTURED_FORMATS = {
    "unconstrained": {},
    "guided_regex": {"guided_regex": "[a-z]+( [a-z]+)*"},
    "unconstrained, sampled": SAMPLED,
    "guided_regex, sampled": {"guided_regex": "[a-z]+( [a-z]+)*", **SAMPLED},
    "json_schema": {
        "response_format": {
            "type": "json_schema",
            "json_schema": {
                "name": "road",
                "schema": {
                    "type": "object",
                    "properties": {"action": {"type": "string"}, "lanes": {"type": "integer"}},
                    "required": ["action", "lanes"],
                },
            },
        }
    },
}


def structured_output(args: BenchmarkArguments) -> None:
    """Sequential requests, unconstrained, with a guided_regex and with a json_schema in turn, greedy (and sampled at
    temperature 1 beside unconstrained sampled ones: a sampled row is always masked): the mean time between a
    request's tokens as the server measures it (its inter-token latency histogram, read before and after each
    request; prefill, HTTP set-up and the chunking of the text left out), median over requests."""
    process, base_url = start_server(args)
    per_token: dict[str, list[float]] = {kind: [] for kind in STRUCTURED_FORMATS}
    tokens: dict[str, int] = dict.fromkeys(STRUCTURED_FORMATS, 0)
    try:
        with httpx.Client(timeout=300) as http:
            for index in range(args.requests + 2):
                for kind, extra in STRUCTURED_FORMATS.items():
                    body = {**chat_request(index, args.max_tokens, image=False, stream=False), **extra}
                    before = inter_token_totals(http, base_url)
                    status, completion_tokens, _ = send(http, base_url, body)
                    after = inter_token_totals(http, base_url)
                    if status != 200:
                        raise RuntimeError(f"{kind} request {index}: HTTP {status}")
                    if index >= 2 and after[1] > before[1]:  # the first rounds warm up (and compile the grammars)
                        per_token[kind].append((after[0] - before[0]) / (after[1] - before[1]))
                        tokens[kind] += completion_tokens
    finally:
        process.terminate()
        process.wait(60)
    unconstrained = statistics.median(per_token["unconstrained"])
    print()
    print(
        f"Structured output: {args.requests} requests of up to {args.max_tokens} tokens of each kind, in turn (greedy "
        "unless sampled); the server's inter-token latency"
    )
    print()
    print("| requests | measured | tokens | median ms between tokens | / unconstrained (same decoding) |")
    print("|---|---|---|---|---|")
    for kind, values in per_token.items():
        median = statistics.median(values)
        base = statistics.median(per_token["unconstrained, sampled"]) if "sampled" in kind else unconstrained
        print(f"| {kind} | {len(values)} | {tokens[kind]} | {median * 1000:.2f} | {median / base:.2f}x |")


def rss_mib(process: subprocess.Popen) -> float:
    with open(f"/proc/{process.pid}/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def raw_body(text: str) -> bytes:
    """A chat body with one more field as raw JSON text (what json.dumps cannot write)."""
    return b'{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, ' + text.encode() + b"}"


def png_url(width: int, height: int, mode: str = "RGBA") -> str:
    buffer = io.BytesIO()
    Image.new(mode, (width, height), (10, 20, 30, 255)[: len(mode)]).save(buffer, format="PNG")
    return f"data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}"


def bad_requests() -> list[tuple[str, bytes]]:
    """(path, body) of the inputs the issue's probes sent: each must be a 4xx."""
    big = png_url(4096, 4096)
    four_big = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": big}}] * 4}]}
    bodies = [
        raw_body('"x": ' + "[" * 3000 + "]" * 3000),
        raw_body('"seed": ' + "9" * 5000),
        raw_body('"model": "\\ud800"'),
        raw_body('"stream": "yes"'),
        raw_body('"seed": 18446744073709551616'),
        raw_body('"temperature": NaN'),
        raw_body('"top_p": 0'),
        b'{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": true}',
        b"\xff\xfe not json",
        json.dumps(four_big).encode(),
    ]
    requests = [("/v1/chat/completions", body) for body in bodies]
    driving = b'{"scene_queries": [[NaN]], "history_queries": [[1e308]], "can_bus": [Infinity]}'
    return [*requests, ("/v1/trajectory", driving)]


def hostile_load(args: BenchmarkArguments) -> None:
    """`hostile_clients` clients for `hostile_seconds`: good requests (a quarter of the streams abandoned after their
    first token) and one client sending `bad_requests()` throughout; reports 5xx answers and the server's RSS."""
    process, base_url = start_server(args)
    bad = bad_requests()
    deadline_box: list[float] = []
    good: list[tuple[int, str]] = []
    hostile: list[int] = []
    lock = threading.Lock()

    def good_client(client: int) -> None:
        with httpx.Client(timeout=300) as http:
            index = 0
            while time.monotonic() < deadline_box[0]:
                index += 1
                stream = (client + index) % 3 == 0
                abandon = stream and (client + index) % 4 == 0
                body = chat_request(client * 1000 + index, 1 + index % 16, image=index % 4 == 0, stream=stream)
                body["temperature"] = [0, 0.7, 2.69e-38][index % 3]
                if abandon:
                    with http.stream("POST", f"{base_url}/v1/chat/completions", json=body) as response:
                        status = response.status_code
                        for line in response.iter_lines():
                            if '"content":"' in line and '"content":""' not in line:
                                break
                    outcome = "abandoned"
                else:
                    status, _, _ = send(http, base_url, body)
                    outcome = "answered"
                with lock:
                    good.append((status, outcome))

    def bad_client() -> None:
        with httpx.Client(timeout=300) as http:
            index = 0
            while time.monotonic() < deadline_box[0]:
                path, content = bad[index % len(bad)]
                index += 1
                status = http.post(f"{base_url}{path}", content=content).status_code
                with lock:
                    hostile.append(status)

    try:
        run_requests(base_url, [chat_request(index, 4, image=index % 2 == 0, stream=False) for index in range(8)], 4)
        before = rss_mib(process)
        deadline_box.append(time.monotonic() + args.hostile_seconds)
        threads = [threading.Thread(target=good_client, args=(client,)) for client in range(args.hostile_clients - 1)]
        threads.append(threading.Thread(target=bad_client))
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        time.sleep(2)
        after = rss_mib(process)
        alive = httpx.post(f"{base_url}/v1/chat/completions", json=chat_request(0, 2, False, False)).status_code
    finally:
        process.terminate()
        process.wait(60)
    print()
    print(
        f"Hostile load: {args.hostile_clients} clients for {args.hostile_seconds:.0f} s, a quarter of the streams "
        "abandoned, one client sending bad inputs throughout"
    )
    print()
    print(
        "| good requests | abandoned | 5xx to good | bad requests | 4xx to bad | 5xx to bad | RSS before [MiB] | "
        "RSS after [MiB] | growth | answers after |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    abandoned = sum(outcome == "abandoned" for _, outcome in good)
    print(
        f"| {len(good)} | {abandoned} | {sum(status >= 500 for status, _ in good)} | {len(hostile)} | "
        f"{sum(400 <= status < 500 for status in hostile)} | {sum(status >= 500 for status in hostile)} | "
        f"{before:.0f} | {after:.0f} | {(after / before - 1) * 100:+.1f} % | {alive} |"
    )


def image_memory(args: BenchmarkArguments) -> None:
    """Six concurrent requests of four 4096x4096 RGBA PNGs to a server admitting them: RSS before, peak, after."""
    pixels = str(4096 * 4096)
    process, base_url = start_server(args, "--max-image-pixels", pixels, "--max-request-pixels", str(4 * 4096 * 4096))
    big = png_url(4096, 4096)
    body = {
        "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": big}}] * 4}],
        "max_tokens": 2,
    }
    try:
        run_requests(base_url, [chat_request(index, 4, image=True, stream=False) for index in range(4)], 4)
        before = peak = rss_mib(process)
        start = time.perf_counter()
        with ThreadPoolExecutor(6) as pool:
            futures = [
                pool.submit(httpx.post, f"{base_url}/v1/chat/completions", json=body, timeout=600) for _ in range(6)
            ]
            while not all(future.done() for future in futures):
                peak = max(peak, rss_mib(process))
                time.sleep(0.05)
        statuses = [future.result().status_code for future in futures]
        wall = time.perf_counter() - start
        time.sleep(1)
        after = rss_mib(process)
    finally:
        process.terminate()
        process.wait(60)
    print()
    print(f"Image memory: six concurrent requests of four 4096x4096 RGBA PNGs ({len(json.dumps(body))} bytes each)")
    print()
    print("| answered | wall [s] | RSS before [MiB] | peak [MiB] | after [MiB] | after / before |")
    print("|---|---|---|---|---|---|")
    print(f"| {statuses.count(200)}/6 | {wall:.1f} | {before:.0f} | {peak:.0f} | {after:.0f} | {after / before:.3f} |")


if __name__ == "__main__":
    main()
