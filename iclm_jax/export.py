"""``iclm-export --workdir RUN --out DIR [--force]`` (also ``python -m iclm_jax.export``): export the
latest checkpoint of a run for ``transformers`` / ``peft`` users (the layout: ``iclm_jax.hf.export``)."""
from __future__ import annotations

import argparse
import os
import sys

from flax import nnx

from iclm_jax.checkpoint import CorruptCheckpoint
from iclm_jax.hf.export import NotExportable, OutputError, check_out, export_model
from iclm_jax.hf.files import DEFAULT_SHARD_BYTES
from iclm_jax.train.run import load_run


def export(workdir: str, out: str, *, force: bool = False,
           shard_bytes: int = DEFAULT_SHARD_BYTES, custom: bool = True) -> str:
    """Export the latest checkpoint of the run in ``workdir`` to ``out`` (see module docstring)."""
    w, o = os.path.realpath(workdir), os.path.realpath(out)
    if o == w or o.startswith(w + os.sep) or w.startswith(o + os.sep):
        raise OutputError(f"--out {out}: is, is inside or holds --workdir {workdir}; export to a separate "
                          "directory (an export never replaces a run, even with --force)")
    final = check_out(out, force)             # before the checkpoint load (seconds to minutes)
    model, tokenizer, max_len = _load_run(workdir)
    return export_model(model, tokenizer, final, force=force, shard_bytes=shard_bytes,
                        max_positions=max(4096, max_len), custom=custom)


def _load_run(workdir: str):
    """(ICLM, tokenizer, max_len) of the latest checkpoint of the run in ``workdir``."""
    run = load_run(workdir)
    return nnx.merge(run.graphdef, run.state).model, run.data.tokenizer, int(run.data.max_len)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="iclm-export", description="export a trained run to Hugging Face formats")
    p.add_argument("--workdir", required=True, help="run directory (config.json + checkpoints)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    p.add_argument("--shard-bytes", type=int, default=DEFAULT_SHARD_BYTES,
                   help="shard safetensors above this many bytes (default 2 GiB)")
    args = p.parse_args(argv)
    try:
        path = export(args.workdir, args.out, force=args.force, shard_bytes=args.shard_bytes)
    except (OutputError, NotExportable, FileNotFoundError, CorruptCheckpoint) as e:
        print(f"iclm-export: {e}", file=sys.stderr)
        return 2
    print(f"exported {args.workdir} -> {path}")
    return 0


def cli() -> None:
    """Console script ``iclm-export``."""
    sys.exit(main())


if __name__ == "__main__":
    sys.exit(main())
