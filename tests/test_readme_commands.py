"""Every command line in the README runs as written, in a fresh directory, in the README's order.

The ```bash blocks are parsed (continuation lines joined, comments dropped, a heredoc kept with its
command) and each command must match one row of ``COVERAGE``: run here (a training command gets the small
sizes of ``SMALL`` appended: later flags win, so the command's own flags are still parsed and checked), or
not run here, with the reason and the test that covers it instead. A README command that matches no row,
or a row that matches no command, fails ``test_every_readme_command_has_a_row``: a new documented command
cannot go untested by accident. The ``get_config("...")`` calls listed in the config files' docstrings
are built too.
"""
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import time

import pytest

from tests.helpers import one_device_env
from tests.xla_env import xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(REPO, "README.md")

# Small sizes for a training command: two steps, a few problems, evaluation at the end only.
SMALL = ("--config.train.steps=2", "--config.train.batch_size=8", "--config.data.train_problems=16",
         "--config.data.eval_problems=4", "--config.eval.every=0", "--config.eval.at_start=false")
SMALL_VAL = SMALL + ("--config.data.val_problems=4",)     # for the commands that ask for validation problems
EIGHT_DEVICES = {"XLA_FLAGS": xla_flags(8)}

# (regex on the command, how): ("run", extra args, extra env) | ("elsewhere", why not here + what covers it)
COVERAGE = [
    (r"^make demo$", ("elsewhere", "the entry point (iclm_jax.demo) and its fresh-run behaviour: "
                                   "tests/test_demo_fresh.py; its training path: the iclm-train rows here")),
    (r"^make demo-iclm$", ("elsewhere", "iclm_jax.demo --iclm: ~14 min; tests/test_demo_fresh.py runs it small")),
    (r"^make test$", ("elsewhere", "this suite")),
    (r"acre\.py:cpu --workdir=runs/iclm_cpu", ("run", SMALL_VAL, {})),
    (r"acre\.py --workdir=runs/x ", ("run", SMALL, {})),
    (r"^iclm-train --config=experiments/configs/acre\.py:baseline", ("run", SMALL, {})),
    (r"^python -m iclm_jax\.data\.acre generate ", ("run", ("--n", "40"), {})),   # iclm-eval reads it: 500 = 4 min
    (r"^python -m iclm_jax\.data\.acre (check|stats|render) ", ("run", (), {})),
    (r"^iclm-eval --workdir runs/x (?!.*--intervene)", ("run", (), {})),
    (r"^iclm-eval --workdir runs/x .*--intervene=all --report runs/x/interventions$", ("run", (), {})),
    (r"--workdir=runs/mine ", ("run", SMALL, {})),
    (r"^iclm-train --workdir=runs/[me] --config\.mesh", ("run", SMALL, EIGHT_DEVICES)),
    (r"^python -m iclm_jax\.data\.raven (generate|check|stats|render) ", ("run", (), {})),
    (r"raven\.py --workdir=runs/raven$", ("run", SMALL, {})),
    (r"raven\.py:cpu,worked,lookup,baseline,symbolic --workdir=runs/raven_lookup$", ("run", SMALL_VAL, {})),
    (r"^python experiments/prototypes/raven_query_slots\.py runs/raven_lookup$", ("run", (), {})),
    (r"^python -m iclm_jax\.sharding_report ", ("run", (), {})),
    (r"^launch/local\.sh 2 ", ("elsewhere", "tests/test_launch.py runs launch/local.sh 2 with training arguments "
                                          "(and its failure and usage paths)")),
    (r"^sbatch ", ("elsewhere", "needs a SLURM cluster; tests/test_launch.py parses launch/slurm.sbatch and "
                                "tests/test_sweep.py runs a generated array script's dispatch")),
    (r"launch/tpu_pod\.sh ", ("elsewhere", "needs Cloud TPU; tests/test_launch.py parses it, tests/test_sweep.py "
                                           "checks the sweep's TPU commands")),
    (r"smollm2\.py --workdir=runs/smollm2$", ("elsewhere", "the GPU default (30 layers, full data); the same "
                                                           "config at CPU size is the smollm2.py:cpu row")),
    (r"^/usr/bin/time -v .*smollm2\.py --workdir=runs/smol16", ("elsewhere", "measures ~50 GB of memory at "
                                                                             "batch 16: not on a CI machine")),
    (r"^python benchmarks/smollm2_memory\.py .*--run", ("elsewhere", "allocates the batch-16 step (~50 GB)")),
    (r"smollm2\.py:cpu,baseline,symbolic --workdir=runs/smol ", ("run", SMALL_VAL, {})),
    (r"^iclm-export --workdir runs/x --out exported/", ("run", (), {})),
    (r"^python - exported <<'PY'", ("run", (), {})),
    (r"^python -m iclm_jax\.sweep .*--dry-run$", ("run", (), {})),
    (r"^python -m iclm_jax\.sweep .*--only=", ("run", tuple(f"--set={a[len('--config.'):]}" for a in SMALL), {})),
    (r"^python -m iclm_jax\.sweep intervene runs/sweep$", ("run", (), {})),
    (r"^python -m iclm_jax\.sweep collect runs/sweep$", ("run", (), {})),
    (r"acre\.py:cpu --workdir=runs/sweep_cpu$", ("run", ("--dry-run",), {})),   # 12 points of up to an hour
    (r"acre\.py:cpu,symbolic --workdir=runs/sym ", ("run", SMALL_VAL, {})),
    (r"acre\.py:cpu,text --workdir=runs/sym_(grow|finetune) .*--config\.continual\.from_run=runs/sym",
     ("run", SMALL_VAL, {})),
    (r"^python -m iclm_jax\.continual_report ", ("run", ("--problems", "4"), {})),
]


def readme_commands(path: str = README) -> list[tuple[int, str]]:
    """(line number, command) of every command in the file's ```bash blocks."""
    out, block, pending, heredoc = [], False, None, None
    for n, line in enumerate(open(path).read().splitlines(), 1):
        if line.startswith("```"):
            block = line.strip() == "```bash"
            continue
        if not block:
            continue
        if heredoc is not None:                  # inside a heredoc: keep the lines verbatim
            pending = (pending[0], pending[1] + "\n" + line)
            if line == heredoc:
                out.append(pending)
                pending, heredoc = None, None
            continue
        text = line.strip()
        if pending is None and (not text or text.startswith("#")):
            continue
        if pending is None:
            pending = (n, "")
        cont = text.endswith("\\")
        text = text[:-1].rstrip() if cont else re.sub(r"\s+#.*$", "", text)   # no '#' inside our arguments
        pending = (pending[0], f"{pending[1]} {text}".strip())
        m = re.search(r"<<'(\w+)'", text)
        if m:
            heredoc = m.group(1)
        elif not cont:
            out.append(pending)
            pending = None
    return out


def _row(command: str):
    rows = [how for pattern, how in COVERAGE if re.search(pattern, command)]
    return rows[0] if len(rows) == 1 else None


def test_every_readme_command_has_a_row():
    commands = readme_commands()
    assert len(commands) > 20
    for n, cmd in commands:
        n_rows = sum(bool(re.search(p, cmd)) for p, _ in COVERAGE)
        assert n_rows == 1, f"README.md:{n}: {n_rows} rows of COVERAGE match {cmd!r}"
    for pattern, _ in COVERAGE:
        assert any(re.search(pattern, c) for _, c in commands), f"stale COVERAGE row {pattern!r}"


def test_readme_commands_parse():
    """The parser on a hand-written block: continuation, comments, a heredoc."""
    text = ("x\n```bash\n# a comment\nmake demo   # note\npython -m a --b \\\n    --c=1\n\npython - d <<'PY'\n"
            "import x  # kept\nPY\n```\n```\nnot bash\n```\n")
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"readme_parse_{os.getpid()}.md")
    with open(path, "w") as f:
        f.write(text)
    try:
        assert readme_commands(path) == [(4, "make demo"), (5, "python -m a --b --c=1"),
                                         (8, "python - d <<'PY'\nimport x  # kept\nPY")]
    finally:
        os.remove(path)


def test_config_docstring_variants_build():
    """Every get_config("...") a config file's docstring lists builds."""
    names = sorted(f for f in os.listdir(os.path.join(REPO, "experiments", "configs")) if f.endswith(".py"))
    assert names == ["acre.py", "raven.py", "smollm2.py"]
    for name in names:
        path = os.path.join(REPO, "experiments", "configs", name)
        spec = importlib.util.spec_from_file_location(f"readme_cfg_{name[:-3]}", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        args = re.findall(r'get_config\("([^"]*)"\)', mod.__doc__)
        assert args, name
        for arg in args:
            assert mod.get_config(arg) is not None, f"{name}: get_config({arg!r})"


# The commands run in three independent groups, each in a fresh directory in the README's order, so that
# pytest-xdist (--dist loadfile) runs them on different workers: in one test they were ~48 of the suite's
# 113 min on a slow day. A group holds every command that reads another's output (runs/x, runs/raven_lookup,
# runs/sym, runs/sweep). The first group runs in this file, the others in test_readme_run_*.py.
GROUPS = (("raven_continual", r"raven|runs/sym|continual_report"),
          ("scale_sweep", r"config\.mesh\.|sharding_report|smollm2|iclm_jax\.sweep"),
          ("acre", r""))
# What each group's commands must have left behind.
MADE = {"acre": ("runs/x/summary.json", "runs/x/eval_sys.json", "data/acre/Sys/test.text.jsonl", "exported/config.json",
                 "runs/x/interventions/report.md"),
        "raven_continual": ("runs/raven/summary.json", "data/raven/d4.text.jsonl", "runs/continual"),
        "scale_sweep": ("runs/mine/summary.json", "runs/sweep/results.md",
                        "runs/sweep/variant=iclm,seed=0/interventions/report.md", "runs/sweep/interventions.png")}


def group_of(command: str) -> str:
    return next(name for name, pattern in GROUPS if re.search(pattern, command))


def test_every_group_runs_commands_and_keeps_its_inputs_together():
    """Each group runs at least one command; a command that names a run directory (runs/NAME) is in the one
    group whose commands write into it (--workdir/--out)."""
    runs = [(n, c) for n, c in readme_commands() if _row(c)[0] == "run"]
    assert {group_of(c) for _, c in runs} == {name for name, _ in GROUPS}
    writers = {}                                        # runs/NAME -> the groups whose commands write into it
    for _, c in runs:
        for d in re.findall(r"--(?:workdir|out)[= ](runs/\w+)", c):
            writers.setdefault(d, set()).add(group_of(c))
    for _, c in runs:
        for d in re.findall(r"\b(runs/\w+)\b", c):
            if d in writers:
                assert writers[d] == {group_of(c)}, (c, d, writers[d])


def run_group(tmp_path, group: str, min_commands: int):
    """Runs the README commands of ``group`` as written (with the ``COVERAGE`` row's extra arguments) in
    ``tmp_path``, in the README's order, and checks what they leave behind."""
    for d in ("experiments", "launch", "benchmarks"):
        os.symlink(os.path.join(REPO, d), tmp_path / d)
    own = re.search(r"### Use your own data.*?\n```\n(.*?)```", open(README).read(), re.S).group(1)
    for name in ("my.jsonl", "my_test.jsonl"):          # the README's own example records
        (tmp_path / name).write_text(own)
    bin_dir = os.path.dirname(sys.executable)           # the README: "activate the virtual environment"
    base_env = dict(one_device_env(), PATH=f"{bin_dir}:{os.environ['PATH']}")
    ran, took = 0, []
    for n, cmd in readme_commands():
        how = _row(cmd)
        if how[0] != "run" or group_of(cmd) != group:
            continue
        extra, env = how[1], how[2]
        if "<<" in cmd:
            head, rest = cmd.split("\n", 1)
            full, stdin = head.replace("<<'PY'", "").strip(), rest.rsplit("\n", 1)[0] + "\n"
        else:
            full, stdin = cmd + "".join(f" {a}" for a in extra), None
        t0 = time.perf_counter()
        r = subprocess.run(["bash", "-c", full], cwd=tmp_path, env={**base_env, **env}, input=stdin,
                           capture_output=True, text=True, timeout=900)
        took.append((time.perf_counter() - t0, n))
        assert r.returncode == 0, f"README.md:{n}: {full}\nexit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        ran += 1
    print(f"slowest README commands ({group}):", ", ".join(f"line {n} {t:.0f}s" for t, n in sorted(took)[::-1][:6]))
    assert ran >= min_commands
    for made in MADE[group]:
        assert (tmp_path / made).exists(), made
    shutil.rmtree(tmp_path / "runs", ignore_errors=True)


@pytest.mark.slow
def test_readme_commands_run_as_written(tmp_path):
    run_group(tmp_path, "acre", 10)
