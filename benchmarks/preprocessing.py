"""Preprocessing speed and memory: cold and cached loads of TJH and the MIMIC-IV demo, and the peak
memory of MIMIC-IV chartevents reading against the chunk size.

    python benchmarks/preprocessing.py [--repeats 3] [--out results/bench_preprocessing.json]

Targets (issue 2): cold TJH < 10 s, cold MIMIC-IV demo < 60 s, a cached load < 2 s, and a MIMIC-IV peak
memory that follows the chunk size, not the table size. Each measurement runs in a fresh
subprocess with its own empty cache, so import costs and warm caches do not leak between them.
Peak memory is measured two ways around the call alone: ``tracemalloc`` (the numpy/pandas arrays,
which report to it; the CSV parser's own C buffers do not) and the growth of the process's peak RSS
over a warm-up run with a tiny chunk (everything, but coarse). Times in the chunk table run under
``tracemalloc`` and are slower than the plain load times above them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

CHILD = r"""
import json, resource, sys, time, tracemalloc
from pathlib import Path
from datamodules import EHRDataModule
from eagrl.data import mimic_iv
from eagrl.paths import data_dir

kind, arg, cache = sys.argv[1], sys.argv[2], sys.argv[3]
if kind == "load":  # arg = dataset; cold on an empty cache, then cached
    out = {}
    for phase in ("cold", "cached"):
        start = time.perf_counter()
        EHRDataModule(dataset=arg, cache_dir=cache, progress=False).load_cohort()
        out[phase] = time.perf_counter() - start
else:  # chunk: arg = chunk size; peak memory of reading and reducing the demo's chartevents
    source = data_dir() / "mimic-iv-demo"
    mimic_iv.load_mimic_iv(source, chunk_size=1000, progress=False)  # warm the imports and the file cache
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tracemalloc.start()
    start = time.perf_counter()
    mimic_iv.load_mimic_iv(source, chunk_size=int(arg), progress=False)
    out = {"seconds": time.perf_counter() - start, "peak_mib": tracemalloc.get_traced_memory()[1] / 2**20}
    out["rss_growth_mib"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
print(json.dumps(out))
"""


def child(kind: str, arg: str) -> dict:
    with tempfile.TemporaryDirectory() as cache:
        done = subprocess.run([sys.executable, "-c", CHILD, kind, arg, cache], cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"benchmark child failed ({kind} {arg}):\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement (the median is reported)")
    parser.add_argument("--chunks", type=int, nargs="+", default=[10_000, 50_000, 200_000, 1_000_000], help="chunk sizes")
    parser.add_argument("--out", type=Path, default=REPO / "results" / "bench_preprocessing.json", help="JSON output")
    args = parser.parse_args()

    from eagrl.io import write_json_atomic
    from eagrl.paths import data_dir

    rows = sum(1 for _ in __import__("gzip").open(data_dir() / "mimic-iv-demo/icu/chartevents.csv.gz", "rt")) - 1
    report: dict = {"chartevents_rows": rows, "load": {}, "chunks": {}}
    print(f"MIMIC-IV demo chartevents: {rows:,d} rows")
    for dataset in ("tjh", "mimic_iv"):
        runs = [child("load", dataset) for _ in range(args.repeats)]
        report["load"][dataset] = {phase: statistics.median(r[phase] for r in runs) for phase in ("cold", "cached")}
        print(f"{dataset:9s} cold {report['load'][dataset]['cold']:6.2f} s   cached {report['load'][dataset]['cached']:6.3f} s")
    for chunk in args.chunks:
        result = child("chunk", str(chunk))
        report["chunks"][str(chunk)] = result
        print(
            f"chartevents chunk {chunk:>9,d} rows: traced peak {result['peak_mib']:6.1f} MiB, "
            f"peak RSS growth {result['rss_growth_mib']:6.1f} MiB, {result['seconds']:5.2f} s"
        )
    write_json_atomic(args.out, report)
    print(f"wrote {args.out.relative_to(REPO) if args.out.is_relative_to(REPO) else args.out}")


if __name__ == "__main__":
    main()
