"""Compare nearest-neighbour search of patch features: chunked matrix product against faiss.

    .venv/bin/python benchmarks/bench_memory_bank.py [--repeats 15] [--output docs/benchmarks.md]

For each memory bank size (rows x 384 dims, stored in float16 as the detector stores
it) and each query count per frame, times in the same process:

- ``matmul``: ``qcstream.models.memory_bank.nearest_neighbor_distances`` with the
  matrix-product path, converting the float16 bank to float32 chunk by chunk per call;
- ``matmul fp32``: the same function on a float32 copy of the bank made once, which
  shows how much of the difference is the per-call float16 conversion;
- ``faiss``: an exact ``faiss.IndexFlatL2`` built once from a float32 copy of the bank,
  searched for k=1 per call (the build is not timed, the worker builds it once).

Reports the median milliseconds per frame over ``--repeats`` calls after one warm-up,
the calls of the paths alternating,
and the largest distance difference between the two paths. Appends the results, with
the command, machine and date, to the output file when ``--output`` is given.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from qcstream.models.memory_bank import matmul_nearest_neighbor_distances

FEATURE_DIM = 384
BANK_ROWS = (5_000, 20_000, 50_000)
QUERIES_PER_FRAME = (576, 1024)


def median_ms_interleaved(searches: dict, repeats: int) -> dict[str, float]:
    """Time the searches in turn, one call each per round, so load from other processes hits them alike."""
    for search in searches.values():
        search()
    times: dict[str, list[float]] = {name: [] for name in searches}
    for _ in range(repeats):
        for name, search in searches.items():
            started = time.perf_counter()
            search()
            times[name].append((time.perf_counter() - started) * 1000)
    return {name: statistics.median(values) for name, values in times.items()}


def measure(repeats: int) -> list[dict]:
    import faiss

    generator = torch.Generator().manual_seed(0)
    rows = []
    for bank_rows in BANK_ROWS:
        bank = torch.randn(bank_rows, FEATURE_DIM, generator=generator).half()
        bank_fp32 = bank.float()
        index = faiss.IndexFlatL2(FEATURE_DIM)
        index.add(bank_fp32.numpy())
        for n_queries in QUERIES_PER_FRAME:
            queries = torch.randn(n_queries, FEATURE_DIM, generator=generator)
            query_array = queries.numpy()

            matmul = matmul_nearest_neighbor_distances(queries, bank)
            squared, _ = index.search(query_array, 1)
            via_faiss = torch.from_numpy(np.sqrt(np.maximum(squared[:, 0], 0.0)))
            timings = median_ms_interleaved({
                "matmul_ms": lambda: matmul_nearest_neighbor_distances(queries, bank),
                "matmul_fp32_ms": lambda: matmul_nearest_neighbor_distances(queries, bank_fp32),
                "faiss_ms": lambda: index.search(query_array, 1),
            }, repeats)
            rows.append({
                "bank_rows": bank_rows,
                "queries": n_queries,
                **timings,
                "max_abs_diff": float((matmul - via_faiss).abs().max()),
            })
            print(rows[-1], flush=True)
    return rows


def machine() -> str:
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{platform.machine()}, {os.cpu_count()} cores, {memory_gib:.0f} GiB, Python {platform.python_version()}, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads)"
    )


def report(rows: list[dict], command: str, repeats: int, load_at_start: str) -> str:
    import faiss

    lines = [
        f"## Memory bank nearest-neighbour search, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        "",
        f"Command: `{command}`. Machine: {machine()}, faiss-cpu {faiss.__version__} "
        f"({faiss.omp_get_max_threads()} threads). Random float16 bank of {FEATURE_DIM}-dim rows, "
        f"median ms per frame over {repeats} calls after one warm-up, all paths in the same run "
        f"with their calls alternating. Load average at the start: {load_at_start}.",
        "",
        "| bank rows | queries per frame | matmul, fp16 bank (default before), ms | matmul, fp32 copy, ms "
        "| faiss IndexFlatL2, fp32 copy, ms | max distance difference, matmul vs faiss |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['bank_rows']} | {row['queries']} | {row['matmul_ms']:.1f} | {row['matmul_fp32_ms']:.1f} "
            f"| {row['faiss_ms']:.1f} | {row['max_abs_diff']:.1e} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--output", type=Path, help="markdown file to append the results to")
    args = parser.parse_args()

    load_at_start = " ".join(f"{value:.1f}" for value in os.getloadavg())
    rows = measure(args.repeats)
    command = "python benchmarks/bench_memory_bank.py " + " ".join(sys.argv[1:])
    section = report(rows, command.strip(), args.repeats, load_at_start)
    print(section)
    if args.output is not None:
        with args.output.open("a") as handle:
            handle.write("\n" + section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
