"""Ahead-of-time per-device memory of the ICLM train step for a LLaMA-2-7B-sized frozen base.

No weights are allocated: the train state is built with ``nnx.eval_shape``, the step is lowered for
abstract (ShapeDtypeStruct) state and batch on a mesh of fake CPU devices and compiled; XLA's
``memory_analysis()`` then reports the bytes each device needs. This is how to choose a mesh for a pod
before renting it. The step is the real one (``make_steps``: activation constraints at every block
boundary, per-block remat from ``--remat``). Layers are unrolled (no scan), so compile time grows with
depth, for some meshes faster than linearly; ``--layers=4,8`` compiles two depths and extrapolates every
term linearly to ``--target_layers`` (checked against full 32-layer compiles in docs/scaling.md).

    python benchmarks/aot_memory.py --devices=64 --meshes="data=8,fsdp=8" --layers=32
    python benchmarks/aot_memory.py --devices=64 --meshes="data=4,fsdp=16;fsdp=64" --layers=4,8
    python benchmarks/aot_memory.py --devices=8 --meshes="fsdp=8" --batch=16 --layers=32

CPU-compiled buffer sizes are a proxy for the GPU/TPU compilers' (same shapes and shardings, different
fusion and scheduling): read them as within tens of percent, not exact. Two XLA:CPU defaults would make
the proxy much worse, so they are changed here (``--raw_cpu`` keeps them): XLA:CPU drops the optimization
barriers that ``jax.checkpoint`` puts around a recomputation *before* its CSE passes, which merge the
recomputation back into the forward pass (remat then saves nothing; GPU drops them only after scheduling),
and its default scheduler favours concurrency over memory (it hoists every weight all-gather to the start).
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import time


def _parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--devices", type=int, default=64, help="fake CPU devices (the mesh size)")
    p.add_argument("--meshes", default="data=8,fsdp=8",
                   help="';'-separated meshes, each 'axis=size,...' over data,fsdp,tensor,module")
    p.add_argument("--layers", default="32",
                   help="layer counts to compile; without --target_layers among them, the two deepest "
                        "are extrapolated linearly")
    p.add_argument("--target_layers", type=int, default=32)
    p.add_argument("--batch", type=int, default=64, help="global batch (rows)")
    p.add_argument("--seq_len", type=int, default=2048)
    p.add_argument("--num_modules", type=int, default=4)
    p.add_argument("--lora_rank", type=int, default=16)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--remat", default="block", help="model.remat: none | block | dots")
    p.add_argument("--raw_cpu", action="store_true",
                   help="keep XLA:CPU's barrier expansion and concurrency scheduler (see the docstring)")
    return p.parse_args(argv)


# Keep jax.checkpoint's optimization barriers through XLA:CPU's CSE, and schedule for memory.
CPU_FLAGS = ("--xla_disable_hlo_passes=cse_barrier_expander "
             "--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED")


ARGS = _parse_args() if __name__ == "__main__" else None
if ARGS is not None:   # must precede the first jax import
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + ("" if ARGS.raw_cpu else " " + CPU_FLAGS)
                               + f" --xla_force_host_platform_device_count={ARGS.devices}")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

import iclm_jax  # noqa: E402,F401  (disables eager sharding before any module is built)
from iclm_jax import sharding  # noqa: E402
from iclm_jax.train import build  # noqa: E402
from iclm_jax.train.step import make_steps  # noqa: E402

GIB = 1024 ** 3
NUM_SLOTS = 4   # ACRE: 4 packed queries per row


def llama7b_config(n_layers: int, *, num_modules: int = 4, lora_rank: int = 16, dtype: str = "bfloat16",
                   remat: str = "block"):
    """The ICLM config for a LLaMA-2-7B-sized frozen base (acre.py defaults otherwise)."""
    import importlib.util
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "experiments", "configs", "acre.py")
    spec = importlib.util.spec_from_file_location("iclm_acre_config_aot", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config()
    m = c.model
    m.vocab_size, m.d_model, m.n_layers, m.n_heads, m.n_kv_heads = 32000, 4096, n_layers, 32, 32
    m.head_dim, m.mlp_dim, m.tie_embeddings, m.dtype = 128, 11008, False, dtype
    m.train_base, m.num_modules, m.invariant, m.remat = False, num_modules, True, remat
    c.lora.rank, c.lora.alpha, c.lora.targets = lora_rank, 2.0 * lora_rank, "q,k,v,o,gate,up,down"
    return c


def abstract_batch(batch: int, seq_len: int, mesh) -> dict:
    rows = sharding.batch_sharding(mesh)
    def sds(shape, dtype):
        s = rows if len(shape) else None
        return jax.ShapeDtypeStruct(shape, dtype, sharding=s)
    b, rows1 = (batch, seq_len), (batch,)
    return {"inputs": sds(b, jnp.int32), "targets": sds(b, jnp.int32), "positions": sds(b, jnp.int32),
            "segments": sds(b, jnp.int32), "loss_mask": sds(b, jnp.float32),
            "answer_slot": sds(b, jnp.int32), "prompt_mask": sds(b, jnp.float32),
            "domain": sds(rows1, jnp.int32), "query_type": sds((batch, NUM_SLOTS), jnp.int32),
            "query_label": sds((batch, NUM_SLOTS), jnp.int32)}


def measure(config, mesh_axes: dict, batch: int, seq_len: int) -> dict:
    """Compile the train step for abstract inputs; per-device bytes from XLA's memory analysis."""
    mesh = sharding.make_mesh(mesh_axes)
    vocab = config.model.vocab_size
    ts = nnx.eval_shape(lambda: build.train_state(config, vocab))
    state_sh = sharding.state_shardings(nnx.state(ts), mesh)
    graphdef, state, train_step, _ = make_steps(
        ts, build.loss_config(config), num_domains=config.data.num_domains, num_slots=NUM_SLOTS,
        state_sharding=state_sh, batch_sharding=sharding.batch_sharding(mesh))
    abstract = sharding.abstract_state(state, mesh)
    t0 = time.time()
    compiled = train_step.lower(abstract, abstract_batch(batch, seq_len, mesh)).compile()
    m = compiled.memory_analysis()
    params = sum(x.size for x in jax.tree.leaves(state))
    trainable = sum(x.size for x in jax.tree.leaves(nnx.state(ts.model, build_filter(ts))))
    out = {"argument": m.argument_size_in_bytes, "output": m.output_size_in_bytes,
           "temp": m.temp_size_in_bytes, "alias": m.alias_size_in_bytes}
    out["total"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
    out.update(compile_s=time.time() - t0, state_elems=params, trainable=trainable,
               rows=batch // sharding.data_ways(mesh),
               host_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    return out


def build_filter(ts):
    from iclm_jax.model.iclm import param_filter
    return param_filter(ts.train_base)


def _mesh(spec: str) -> dict:
    return {k.strip(): int(v) for k, v in (kv.split("=") for kv in spec.split(",") if kv.strip())}


def extrapolate(by_layers: dict[int, dict], target: int) -> dict:
    """Linear in the layer count through the two deepest measurements (every term is ~linear: the
    per-layer weights, optimiser moments and saved activations; the rest is the layer-free intercept)."""
    (l1, a), (l2, b) = sorted(by_layers.items())[-2:]
    if target in by_layers:
        return by_layers[target]
    return {k: a[k] + (b[k] - a[k]) * (target - l1) / (l2 - l1)
            for k in ("argument", "output", "temp", "alias", "total")}


def main(args: argparse.Namespace) -> None:
    layers = [int(x) for x in args.layers.split(",")]
    print(f"# {jax.device_count()} fake {jax.devices()[0].platform} devices; batch {args.batch} x "
          f"seq {args.seq_len}; K={args.num_modules} + invariant, LoRA r={args.lora_rank}, {args.dtype}, "
          f"remat={args.remat}; XLA:CPU {'defaults' if args.raw_cpu else CPU_FLAGS}")
    print("| mesh | rows/device | layers | argument GiB | output GiB | temp GiB | alias GiB | total GiB "
          "| compile s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for spec in filter(None, (s.strip() for s in args.meshes.split(";"))):
        got = {}
        for n in layers:
            r = measure(llama7b_config(n, num_modules=args.num_modules, lora_rank=args.lora_rank,
                                       dtype=args.dtype, remat=args.remat), _mesh(spec), args.batch,
                        args.seq_len)
            got[n] = r
            print(f"| {spec} | {r['rows']} | {n} | " + " | ".join(f"{r[k] / GIB:.2f}" for k in
                  ("argument", "output", "temp", "alias", "total")) + f" | {r['compile_s']:.0f} |",
                  flush=True)
            if n == layers[0]:
                print(f"<!-- {n} layers: {r['state_elems'] / 1e9:.2f}B state elements, "
                      f"{r['trainable'] / 1e6:.1f}M trainable; host peak RSS so far "
                      f"{r['host_gib']:.1f} GiB -->", flush=True)
        if args.target_layers not in got and len(got) >= 2:
            e = extrapolate(got, args.target_layers)
            print(f"| {spec} | {r['rows']} | {args.target_layers} (extrapolated) | " + " | ".join(
                f"{e[k] / GIB:.2f}" for k in ("argument", "output", "temp", "alias", "total")) + " | - |",
                flush=True)


if __name__ == "__main__":
    main(ARGS)
