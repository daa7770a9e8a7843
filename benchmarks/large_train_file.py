"""Memory and time of building a run's data from a large training file, read on demand (the default) or
whole (``--whole``: ``acre.load_problems`` + ``pipeline.acre_examples``, as before files were indexed).

A release-format file of about ``--mb`` MB is written first (the generated problems repeated, 4-space
indent as the release), then one process builds the data the way ``iclm-train`` does (``sources.build``:
the indexing pass, then the measuring pass that renders and tokenizes every row) and fits the reference
predictors and the answer-prior loss. It prints the peak resident memory and the seconds of each part.

    python benchmarks/large_train_file.py --mb=200
    python benchmarks/large_train_file.py --mb=200 --whole
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_BUILD = """
import resource, sys, time
sys.path.insert(0, {repo!r})
from iclm_jax import evaluate
from iclm_jax.data import acre, pipeline, sources
from iclm_jax.data.reference import fit_reference
from tests.test_step import acre_cfg
if {whole}:          # the whole-file path: every problem and every rendered row held in memory
    sources.file_examples = lambda path, styles, packed, form="full", extra_queries=False, lazy=False: (
        pipeline.acre_examples(acre.load_problems(path), styles=styles, packed=packed, form=form,
                               extra_queries=extra_queries), acre.load_problems(path))
c = acre_cfg.get_config()
c.data.train_file, c.data.eval_problems = sys.argv[1], 10
t0 = time.time()
d = sources.build(c.data, 0)
t1 = time.time()
fit_reference(d.train_problems)
t2 = time.time()
evaluate.answer_prior_loss(d.train_sample, d.eval_sets[0].examples, d.tokenizer)
t3 = time.time()
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(f"{{len(d.train_examples)}} rows; build {{t1 - t0:.0f}} s, reference predictors {{t2 - t1:.0f}} s, "
      f"answer prior {{t3 - t2:.0f}} s; peak RSS {{rss:.0f}} MiB")
"""


def write_file(path: str, mb: float) -> int:
    from iclm_jax.data import acre_generate
    problems = acre_generate.generate_problems("IID", "train", 200, 0)
    n, size = 0, 0
    with open(path, "w") as f:
        f.write("[\n")
        while size < mb * 2**20:
            text = ("    " if n == 0 else ",\n    ") + json.dumps(problems[n % len(problems)], indent=4)
            f.write(text)
            size += len(text)
            n += 1
        f.write("\n]\n")
    return n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mb", type=float, default=200.0, help="size of the training file to write (MB)")
    p.add_argument("--whole", action="store_true", help="read the file whole (the old path) instead")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "train.json")
        n = write_file(path, args.mb)
        print(f"{path}: {os.path.getsize(path) / 2**20:.0f} MiB, {n} problems; "
              f"{'whole' if args.whole else 'on demand'}", flush=True)
        t0 = time.time()
        r = subprocess.run([sys.executable, "-c", _BUILD.format(repo=REPO, whole=args.whole), path], cwd=REPO)
        print(f"total {time.time() - t0:.0f} s")
        sys.exit(r.returncode)


if __name__ == "__main__":
    main()
