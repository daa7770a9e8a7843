"""Peak memory of the SmolLM2-135M ICLM train step, eval step and KV-cached generation
(experiments/configs/smollm2.py) at a batch.

The train state is built abstractly (``nnx.eval_shape``), the real jitted programs (``make_steps`` on a
one-device mesh, ``generate``'s decode loop) are lowered for abstract state and inputs and compiled;
XLA's ``memory_analysis()`` reports the bytes each needs without running it. The row length defaults
to the ACRE text length of the config (``sources.build``: the longest tokenized row, rounded up), as a
real run uses; generation continues prompts of that length by ``--new_tokens``. ``--run`` then also
runs one train step on random weights (the compiled program at that batch) and reports the process's
peak RSS: the measurement, on the host, of what the analysis predicts.

    python benchmarks/smollm2_memory.py --batch=16 --run              # train, eval, generation; one step
    python benchmarks/smollm2_memory.py --batch=16 --config_arg=text  # a variant of smollm2.py
    python benchmarks/smollm2_memory.py --batch=16 --set model.scan_layers=False  # the unrolled stack

total = argument + output + temp - alias (alias: donated state reused for the output). The programs are
compiled as ``iclm_jax.main`` compiles them (XLA:CPU defaults); ``--proxy_flags`` applies
aot_memory.py's settings instead (see benchmarks/README.md), which only matter for an unrolled stack.
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq_len", type=int, default=0, help="row length (0: the config's ACRE text length)")
    p.add_argument("--config_arg", default="", help="argument of experiments/configs/smollm2.py")
    p.add_argument("--set", action="append", default=[],
                   help="config override 'a.b=value' (python literal), repeatable")
    p.add_argument("--run", action="store_true", help="also run one train step (random weights)")
    p.add_argument("--skip_eval", action="store_true")
    p.add_argument("--skip_generate", action="store_true")
    p.add_argument("--new_tokens", type=int, default=16, help="generated tokens per prompt")
    p.add_argument("--proxy_flags", action="store_true",
                   help="aot_memory.py's XLA:CPU settings (keep remat barriers, memory-optimised schedule)")
    return p.parse_args(argv)


ARGS = _parse_args() if __name__ == "__main__" else None
if ARGS is not None:   # before the first jax import
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=1"
    if ARGS.proxy_flags:   # as aot_memory.py: keep remat barriers through XLA:CPU's CSE, schedule for memory
        os.environ["XLA_FLAGS"] += (" --xla_disable_hlo_passes=cse_barrier_expander"
                                    " --xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED")
    sys.path.insert(0, ROOT)

import ast  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import iclm_jax  # noqa: E402,F401
from iclm_jax import sharding  # noqa: E402
from iclm_jax.train import build  # noqa: E402
from iclm_jax.train.step import make_steps  # noqa: E402

GIB = 1024 ** 3


def smollm2_config(arg: str = "", overrides=()):
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        "iclm_smollm2_config_mem", os.path.join(ROOT, "experiments", "configs", "smollm2.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config(arg)
    for item in overrides:
        key, value = item.split("=", 1)
        node = c
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = ast.literal_eval(value)
    return c


def row_shape(config) -> tuple[int, int]:
    """(max_len, num_slots) a run of ``config`` uses (tokenizes its training and eval examples)."""
    from iclm_jax.data import sources
    data = sources.build(config.data, config.seed)
    return data.max_len, data.num_slots


def abstract_batch(batch: int, seq_len: int, num_slots: int) -> dict:
    b = (batch, seq_len)
    sds = jax.ShapeDtypeStruct
    return {"inputs": sds(b, jnp.int32), "targets": sds(b, jnp.int32), "positions": sds(b, jnp.int32),
            "segments": sds(b, jnp.int32), "loss_mask": sds(b, jnp.float32),
            "answer_slot": sds(b, jnp.int32), "prompt_mask": sds(b, jnp.float32),
            "domain": sds((batch,), jnp.int32), "query_type": sds((batch, num_slots), jnp.int32),
            "query_label": sds((batch, num_slots), jnp.int32)}


def _memory(compiled) -> dict:
    m = compiled.memory_analysis()
    out = {"argument": m.argument_size_in_bytes, "output": m.output_size_in_bytes,
           "temp": m.temp_size_in_bytes, "alias": m.alias_size_in_bytes}
    out["total"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
    return out


def steps(config, num_slots: int):
    """(mesh, state shardings, abstract placed state, train step, eval step, abstract train state)."""
    mesh = sharding.make_mesh({"data": 1})
    ts = nnx.eval_shape(lambda: build.train_state(config, config.model.vocab_size))
    state_sh = sharding.state_shardings(nnx.state(ts), mesh)
    graphdef, state, train_step, eval_step = make_steps(
        ts, build.loss_config(config), num_domains=config.data.num_domains, num_slots=num_slots,
        state_sharding=state_sh, batch_sharding=sharding.batch_sharding(mesh))
    return mesh, state_sh, sharding.abstract_state(state, mesh), train_step, eval_step, ts


def generation(ts_abstract, batch: int, prompt_len: int, new_tokens: int):
    """The whole-ICLM decode program (``generate._run``: prefill of every active module, router once,
    the token loop) lowered for the abstract model and ``batch`` prompts of ``prompt_len`` tokens."""
    from iclm_jax import generate as gen
    graphdef, state = nnx.split(ts_abstract.model)
    sds = jax.ShapeDtypeStruct
    i32 = lambda: sds((), jnp.int32)   # noqa: E731
    return gen._run.lower(
        graphdef, state, sds((batch, prompt_len), jnp.int32), sds((batch,), jnp.int32),
        sds((batch,), jnp.int32), i32(), i32(), i32(), sds((), jnp.float32),
        jax.eval_shape(lambda: jax.random.key(0)), i32(), single=False, greedy=True, top_k=0,
        n_cap=new_tokens, want_logits=False).compile()


def _row(name: str, r: dict, secs: float) -> str:
    return (f"| {name} | " + " | ".join(f"{r[k] / GIB:.3f}" for k in ("argument", "output", "temp", "alias",
                                                                      "total")) + f" | {secs:.0f} |")


def random_batch(batch: int, seq_len: int, num_slots: int, vocab: int) -> dict:
    """A packed-like row: the prompt, then ``num_slots`` answers of 2 targets at the end."""
    rng = np.random.default_rng(0)
    inputs = rng.integers(1, vocab, size=(batch, seq_len)).astype(np.int32)
    out = {k: np.zeros((batch, seq_len), np.int32) for k in ("targets", "segments", "positions")}
    out["targets"][:, :-1] = inputs[:, 1:]
    out["segments"][:] = 1
    out["positions"][:] = np.arange(seq_len)
    loss_mask = np.zeros((batch, seq_len), np.float32)
    slot = np.full((batch, seq_len), -1, np.int32)
    for j in range(num_slots):
        at = seq_len - 2 * (num_slots - j) - 1
        loss_mask[:, at:at + 2] = 1
        slot[:, at:at + 2] = j
    return {"inputs": inputs, **out, "loss_mask": loss_mask, "answer_slot": slot,
            "prompt_mask": (loss_mask == 0).astype(np.float32), "domain": np.zeros(batch, np.int32),
            "query_type": np.zeros((batch, num_slots), np.int32),
            "query_label": np.zeros((batch, num_slots), np.int32)}


def main(args: argparse.Namespace) -> None:
    config = smollm2_config(args.config_arg, args.set)
    t0 = time.time()
    if args.seq_len:     # skip tokenizing the data set (minutes on a slow CPU)
        from iclm_jax.data import tasks
        d = config.data
        max_len = args.seq_len
        num_slots = tasks.get(d.get("task", "acre")).max_queries(d.get("extra_queries", False)) if d.packed else 1
    else:
        max_len, num_slots = row_shape(config)
    seq_len = max_len
    print(f"# SmolLM2-135M ICLM ({args.config_arg or 'default'} {args.set}): batch {args.batch} x "
          f"{seq_len} ({'given' if args.seq_len else 'the ACRE text length'}, {num_slots} answer slots; "
          f"{time.time() - t0:.0f}s); "
          f"loss.aux_weight={config.loss.aux_weight}, loss.context_weight={config.loss.context_weight}, "
          f"model.remat={config.model.remat}, jax {jax.__version__} {jax.devices()[0].platform}")
    mesh, state_sh, abstract, train_step, eval_step, ts = steps(config, num_slots)
    flags = "aot_memory.py's proxy flags" if args.proxy_flags else "XLA:CPU defaults, as iclm_jax.main"
    print(f"# model.scan_layers={config.model.get('scan_layers', False)}, compiled with {flags}")
    batch = abstract_batch(args.batch, seq_len, num_slots)
    print("| step | argument GiB | output GiB | temp GiB | alias GiB | total GiB | compile s |")
    print("|---|---|---|---|---|---|---|")
    t0 = time.time()
    compiled = train_step.lower(abstract, batch).compile()
    print(_row("train", _memory(compiled), time.time() - t0), flush=True)
    if not args.skip_eval:
        t0 = time.time()
        ev = eval_step.lower(abstract, batch).compile()
        print(_row("eval", _memory(ev), time.time() - t0), flush=True)
    if not args.skip_generate:
        t0 = time.time()
        g = generation(ts, args.batch, seq_len, args.new_tokens)
        print(_row(f"generate ({seq_len} + {args.new_tokens} tokens)", _memory(g), time.time() - t0),
              flush=True)
    print(f"<!-- host peak RSS after compiling: "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB -->", flush=True)
    if args.run:
        # Built op by op (a jitted init of 30 unrolled layers compiles for minutes), then placed.
        state = jax.device_put(nnx.state(build.train_state(config, config.model.vocab_size)), state_sh)
        host = random_batch(args.batch, seq_len, num_slots, config.model.vocab_size)
        t0 = time.time()
        state, metrics = compiled(state, sharding.put_batch(host, mesh))
        loss = float(metrics["loss"])
        print(f"one train step at batch {args.batch}: loss {loss:.3f} (ln V = "
              f"{np.log(config.model.vocab_size):.3f}) in {time.time() - t0:.1f}s; host peak RSS "
              f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB", flush=True)


if __name__ == "__main__":
    main(ARGS)
