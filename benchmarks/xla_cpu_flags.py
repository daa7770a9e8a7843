"""XLA CPU flags against the default on the single-LoRA train step (a probe, not a section of the suite).

    python -m benchmarks.xla_cpu_flags [--shapes tiny,large] [--rounds 2]

Each flag set runs in a process of its own (XLA reads its flags once), one set after another, ``--rounds``
times over; a process builds ``harness.bench_config(shape, "baseline")``, compiles, warms up two steps and
prints the median and min of the next steps (20 tiny, 4 large). Run it on an otherwise idle machine: the
processes are not interleaved, so a neighbour's load moves one row and not the others.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

FLAGS = ("", "--xla_cpu_use_xnnpack=false", "--xla_cpu_enable_concurrency_optimized_scheduler=true",
         "--xla_cpu_use_onednn=true", "--xla_cpu_experimental_ynn_fusion_type=", "--xla_cpu_multi_thread_eigen=false")
STEPS = {"tiny": 20, "large": 4}


def _worker(shape: str, steps: int) -> None:
    from benchmarks import harness as H
    b = H.step_bench(H.bench_config(shape, "baseline"), n_batches=2)
    t0 = time.perf_counter()
    b()
    first = time.perf_counter() - t0
    ts = H.interleaved({"step": b}, steps, warmup=2)["step"]
    print(json.dumps({"first_s": round(first, 2), "med_ms": round(H.med(ts) * 1e3, 1),
                      "min_ms": round(min(ts) * 1e3, 1)}), flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="tiny,large")
    p.add_argument("--rounds", type=int, default=2)
    a = p.parse_args(argv)
    print("| round | shape | XLA flag | first step (compile) | step median | step min |\n|---|---|---|---|---|---|")
    for r in range(1, a.rounds + 1):
        for shape in a.shapes.split(","):
            for flag in FLAGS:
                env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count=1 {flag}".strip()}
                out = subprocess.run([sys.executable, "-m", "benchmarks.xla_cpu_flags", "worker", shape,
                                      str(STEPS[shape])], env=env, capture_output=True, text=True)
                if out.returncode != 0:
                    print(f"error: {shape} {flag or 'default'}: {out.stderr.strip().splitlines()[-1]}", file=sys.stderr)
                    return 1
                m = json.loads(out.stdout.strip().splitlines()[-1])
                cells = [r, shape, flag or "default", f"{m['first_s']} s", f"{m['med_ms']} ms", f"{m['min_ms']} ms"]
                print("| " + " | ".join(map(str, cells)) + " |", flush=True)
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["worker"]:
        _worker(sys.argv[2], int(sys.argv[3]))
    else:
        sys.exit(main())
