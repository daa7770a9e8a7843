"""experiments/prototypes/router_diagnosis.py (cited by acre_cpu.md): its NumPy re-routing must be the model's.

The diagnosis runs in a process of its own, as a user runs it: loading and evaluating a run inside a long-lived
pytest worker that has already trained others once aborted inside XLA (as in test_faults' SIGTERM test)."""
import json
import pathlib
import subprocess
import sys

from tests.helpers import one_device_env, write_random_run
from tests.test_generate_score import _config as tiny_config

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO / "experiments" / "prototypes" / "router_diagnosis.py"

# Diagnoses each run directory given and prints one JSON line: the numbers checked, and main()'s printout.
_DIAGNOSE = """
import contextlib, importlib.util, io, json, sys
spec = importlib.util.spec_from_file_location("router_diagnosis", sys.argv[1])
diag = importlib.util.module_from_spec(spec); spec.loader.exec_module(diag)
out = {}
for work in sys.argv[2:]:
    o = diag.diagnose(work)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        diag.main([work])
    out[work] = {"agree": o["agree"], "nmi": o["model"][0], "within_rms": o["within rms"],
                 "rows": [int(o[k][1].sum()) for k in ("model", "own mean", "extra queries")],
                 "printed": buf.getvalue()}
print(json.dumps(out))
"""


def test_numpy_routes_agree_with_the_models_on_every_row(tmp_path):
    works = []
    for center, normalize in [(True, True), (False, False)]:
        c = tiny_config()
        c.model.num_modules = 2
        c.router.center, c.router.normalize = center, normalize
        c.data.update(val_problems=4, extra_queries=True)
        work = tmp_path / f"center={center}"
        work.mkdir()
        write_random_run(work, c)
        works.append(str(work))
    r = subprocess.run([sys.executable, "-c", _DIAGNOSE, str(SCRIPT), *works], cwd=REPO, env=one_device_env(),
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    for work in works:
        o = out[work]
        assert o["agree"] == 1.0, work
        assert o["rows"] == [8, 8, 8], work                          # 4 problems x 2 renderings, each way
        assert 0.0 <= o["nmi"] <= 1.0 and o["within_rms"] > 0
        assert "agrees with the model on 100.0% of the rows" in o["printed"]
