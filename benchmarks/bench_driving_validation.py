"""How long checking ORION-size driving records takes, against the time to read them.

Writes `--num_records` synthetic records at the released ORION sizes (512 scene queries x 256, 16 history
queries x 256, a CAN bus of 89) to one Arrow file, memory-maps it, then times

- reading: every record as numpy arrays, in batches (`Dataset.with_format("numpy").iter`), before and after;
- validation: `check_driving_dataset` (`Dataset.map(batched=True, num_proc=...)`);
- the former per-record loop (`check_driving_record` on Python-formatted records) on `--loop_sample` records.

The file repeats one generated chunk under new ids: generating 27 GB of random queries would take longer than
everything measured, and the checks cost the same on any values.

    python benchmarks/bench_driving_validation.py --num_records 50000 --num_proc 2 --workdir /tmp/driving-bench
"""

import argparse
import json
import shutil
import time
from pathlib import Path

import datasets
import pyarrow as pa
from datasets.arrow_writer import ArrowWriter
from datasets.utils.tqdm import tqdm

from vlmheads.data.driving import check_driving_dataset, synthetic_driving_dataset
from vlmheads.processing.collator_orion_qwen import REQUIRED_FIELDS, check_driving_record

ORION_SIZES = {"num_scene_queries": 512, "num_history_queries": 16, "query_dim": 256, "can_bus_dim": 89}


def write_records(path: Path, num_records: int, chunk: int) -> datasets.Dataset:
    """`num_records` ORION-size records in one Arrow file (one chunk of `chunk` records, written repeatedly under
    new ids), returned memory-mapped."""
    part = synthetic_driving_dataset(chunk, with_answers=False, **ORION_SIZES)
    features, part = part.features, part.data.table
    with ArrowWriter(features=features, path=str(path)) as writer:
        for start in tqdm(range(0, num_records, chunk), desc="Writing ORION-size records"):
            size = min(chunk, num_records - start)
            ids = pa.array([f"record-{index}" for index in range(start, start + size)], type=pa.string())
            writer.write_table(part.slice(0, size).set_column(part.schema.get_field_index("id"), "id", ids))
        writer.finalize()
    return datasets.Dataset.from_file(str(path))


def read_all(dataset: datasets.Dataset, batch_size: int) -> float:
    """Seconds to read every record's fields as numpy arrays (B, 512, 256), (B, 16, 256), (B, 89), (B, 6, 2)."""
    records = dataset.select_columns(list(REQUIRED_FIELDS)).with_format("numpy")
    start = time.perf_counter()
    for batch in records.iter(batch_size=batch_size):
        batch["scene_queries"].shape  # noqa: B018 - the read is the point
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num_records", type=int, default=50_000)
    parser.add_argument("--num_proc", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=500, help="Records generated once and written repeatedly.")
    parser.add_argument("--loop_sample", type=int, default=200, help="Records timed with the per-record loop.")
    parser.add_argument("--workdir", type=Path, default=Path("outputs/driving-validation-bench"))
    parser.add_argument("--keep", action="store_true", help="Keep the written records for another run.")
    args = parser.parse_args()

    args.workdir.mkdir(parents=True, exist_ok=True)
    path = args.workdir / f"orion-{args.num_records}.arrow"
    start = time.perf_counter()
    if path.exists():
        dataset = datasets.Dataset.from_file(str(path))
    else:
        dataset = write_records(path, args.num_records, args.chunk)
    write_seconds = time.perf_counter() - start

    read_first = read_all(dataset, args.batch_size)
    start = time.perf_counter()
    check_driving_dataset(dataset, num_proc=args.num_proc, batch_size=args.batch_size)
    validate_seconds = time.perf_counter() - start
    read_second = read_all(dataset, args.batch_size)

    sample = dataset.select(range(min(args.loop_sample, len(dataset))))
    start = time.perf_counter()
    for record in sample:
        check_driving_record(record)
    loop_ms = 1000 * (time.perf_counter() - start) / len(sample)

    read_seconds = (read_first + read_second) / 2
    result = {
        "records": len(dataset),
        "gigabytes": round(path.stat().st_size / 1e9, 2),
        "num_proc": args.num_proc,
        "batch_size": args.batch_size,
        "write_s": round(write_seconds, 1),
        "read_s": [round(read_first, 1), round(read_second, 1)],
        "validate_s": round(validate_seconds, 1),
        "validate_over_read": round(validate_seconds / read_seconds, 2),
        "validate_ms_per_record": round(1000 * validate_seconds / len(dataset), 3),
        "former_loop_ms_per_record": round(loop_ms, 2),
        "former_loop_s_estimate": round(loop_ms * len(dataset) / 1000, 1),
    }
    print(json.dumps(result, indent=2))
    if not args.keep:
        shutil.rmtree(args.workdir)


if __name__ == "__main__":
    main()
