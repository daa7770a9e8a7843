"""What every benchmark section shares: the machine line, interleaved timing, the matmul peak, the
benchmark shapes, real ACRE batches and a real jitted train step built from a config.

Timing rules (these machines are noisy): every compared function runs once per round, rounds
interleave the functions, the first ``warmup`` rounds are dropped, and a row reports the median with
the min-max over the remaining rounds. Compare ratios from the same run; absolute times only mean
something on an otherwise idle machine (a GPU).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import platform
import statistics
import tempfile
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: The model shapes of the suite (acre_word vocabulary, untied-free Llama blocks, no canon layer so the
#: PyTorch Llama is the same network). "tiny" is the FIELD_NOTES probe's; "large" the issue's ~d=512 x 8.
SHAPES = {
    "tiny": dict(d_model=128, n_layers=2, n_heads=2, n_kv_heads=2, head_dim=64, mlp_dim=384),
    "large": dict(d_model=512, n_layers=8, n_heads=8, n_kv_heads=8, head_dim=64, mlp_dim=1536),
}


@dataclasses.dataclass
class Section:
    """One section of BENCHMARKS.md: a title, what it measures, the command and its tables."""
    name: str
    title: str
    text: str
    command: str


def machine() -> str:
    """CPU model and cores (or the accelerator), and the versions that matter."""
    dev = jax.devices()[0]
    if dev.platform == "cpu":
        model = platform.processor() or "cpu"
        try:
            with open("/proc/cpuinfo") as f:
                model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
        where = f"{model}, {os.cpu_count()} cores"
    else:
        where = f"{len(jax.devices())} x {dev.device_kind}"
    try:
        import torch
        torch_v = f", torch {torch.__version__} ({torch.get_num_threads()} threads)"
    except ImportError:
        torch_v = ""
    return f"{where}; jax {jax.__version__}{torch_v}; load average {os.getloadavg()[0]:.1f} at start"


def interleaved(fns: dict[str, Callable[[], Any]], rounds: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each function (each must block until its result is ready), ``rounds``
    interleaved rounds after ``warmup`` dropped ones."""
    times = {k: [] for k in fns}
    for r in range(warmup + rounds):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            if r >= warmup:
                times[k].append(dt)
    return times


def med(ts: list[float]) -> float:
    return statistics.median(ts)


def fmt_time(ts: list[float]) -> str:
    """median (min-max) in ms."""
    return f"{med(ts) * 1e3:.1f} ms ({min(ts) * 1e3:.1f}-{max(ts) * 1e3:.1f})"


def table(headers: list[str], rows: list[list[Any]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def matmul_fn(n: int = 1024, dtype=jnp.float32) -> tuple[Callable[[], Any], float]:
    """A blocking dense n x n x n matmul on the default device and its FLOPs: time it interleaved with
    the steps it is the limit of, so that both see the same load."""
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    f = jax.jit(lambda x, y: x @ y)
    return (lambda: f(a, b).block_until_ready()), 2.0 * n ** 3


def matmul_peak(n: int = 1024, rounds: int = 7, dtype=jnp.float32) -> float:
    """Dense n x n x n matmul FLOP/s on the default device (median of ``rounds``)."""
    fn, flops = matmul_fn(n, dtype)
    return flops / med(interleaved({"mm": fn}, rounds, warmup=2)["mm"])


def acre_config(variant: str = "demo"):
    """``experiments/configs/acre.py``'s ``get_config(variant)`` (the file is not a package)."""
    path = os.path.join(REPO, "experiments", "configs", "acre.py")
    spec = importlib.util.spec_from_file_location("iclm_bench_acre_config", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(variant)


def bench_config(shape: str, variant: str = "iclm", *, batch: int = 8, styles: str = "symbolic",
                 train_base: bool = False):
    """An acre config at a benchmark shape: frozen base (the paper's setting) unless ``train_base``,
    one rendering (symbolic: ~160-token packed rows), few generated problems (set-up only)."""
    c = acre_config(variant)
    for k, v in SHAPES[shape].items():
        setattr(c.model, k, v)
    c.model.canon, c.model.train_base = 0, train_base
    c.data.styles, c.data.train_problems, c.data.eval_problems = styles, 64, 8
    c.data.eval_splits = "IID"
    c.train.batch_size, c.train.steps, c.train.warmup_steps = batch, 1000, 10
    return c


@dataclasses.dataclass
class StepBench:
    """A real jitted train step (``Run``'s) on real batches; ``__call__`` runs one step and blocks."""
    run: Any
    batches: list
    real_tokens: int          # real (non-padding) tokens per batch, averaged
    padded_tokens: int        # rows x max_len
    i: int = 0

    def __call__(self):
        b = self.batches[self.i % len(self.batches)]
        self.i += 1
        self.run.state, m = self.run.train_step(self.run.state, b)
        jax.block_until_ready(m)

    def compiled(self):
        return self.run.train_step.lower(self.run.state, self.batches[0]).compile()


def step_bench(config, n_batches: int = 4) -> StepBench:
    """Build ``config``'s run (mesh, data, state, jitted steps) and ``n_batches`` placed batches (padded as
    ``data.length_bucket`` says: to max_len, or each to its bucket)."""
    from iclm_jax import sharding
    from iclm_jax.data import pipeline, sources
    from iclm_jax.train.run import Run

    data = sources.build(config.data, config.seed)
    run = Run(config, tempfile.mkdtemp(prefix="iclm_bench_"), data)
    ds = pipeline.make_dataset(data.train_examples, data.tokenizer, max_len=data.max_len,
                               batch_size=config.train.batch_size, num_slots=data.num_slots, seed=0,
                               shuffle=True, repeat=True, length_bucket=config.data.get("length_bucket", 0))
    it = iter(ds)
    host = [next(it) for _ in range(n_batches)]
    real = int(np.mean([(b["segments"] > 0).sum() for b in host]))
    batches = [sharding.put_batch(b, run.mesh, run.rules) for b in host]
    return StepBench(run, batches, real, int(np.mean([b["inputs"].size for b in host])))
