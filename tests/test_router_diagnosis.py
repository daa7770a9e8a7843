"""experiments/prototypes/router_diagnosis.py (cited by acre_cpu.md): its NumPy re-routing must be the model's."""
import importlib.util
import pathlib

import pytest

from tests.helpers import write_random_run
from tests.test_generate_score import _config as tiny_config

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "prototypes" / "router_diagnosis.py"


def _load():
    spec = importlib.util.spec_from_file_location("router_diagnosis", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("center, normalize", [(True, True), (False, False)])
def test_numpy_routes_agree_with_the_models_on_every_row(tmp_path, capsys, center, normalize):
    c = tiny_config()
    c.model.num_modules = 2
    c.router.center, c.router.normalize = center, normalize
    c.data.update(val_problems=4, extra_queries=True)
    write_random_run(tmp_path, c)
    diag = _load()
    out = diag.diagnose(str(tmp_path))
    assert out["agree"] == 1.0
    assert out["model"][1].sum() == out["own mean"][1].sum() == out["extra queries"][1].sum() == 8   # 4 x 2 styles
    assert 0.0 <= out["model"][0] <= 1.0 and out["within rms"] > 0
    diag.main([str(tmp_path)])
    assert "agrees with the model on 100.0% of the rows" in capsys.readouterr().out
