"""Interventions on the modules (``intervene.py``, ``intervention_report.py``, ``iclm-eval --intervene``).

Each test checks against an independent construction. A forced route is checked against ``module_logits``
of that module. An ablated adapter is checked against the LoRA layers' own "no adapter" path (adapter index
-1, the bare base) in that slot. One-stream aggregation is checked against the concat head's closed form.
KV-cached decoding under a forced route is checked against re-running the full forward pass per token, and
the router must not run. The report's numbers are checked against a hand count of per-query exact matches
from the intervened logits of a tiny run.
"""
import dataclasses
import json
import re

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from iclm_jax import generate
from iclm_jax import intervene as iv_lib
from iclm_jax.data import acre_generate, jsonl, pipeline
from iclm_jax.data.render import DOMAINS
from iclm_jax.eval_main import run_eval
from iclm_jax.model.aggregator import _rms
from iclm_jax.model.iclm import ICLM
from iclm_jax.model.lora import LoRAParam
from iclm_jax.train.run import load_run
from tests.helpers import nonzero_lora_b, random_batch, tiny_iclm, write_random_run
from tests.test_generate_score import _config as tiny_run_config

Iv = iv_lib.Intervention


# ---------------------------------------------------------------------------- specs, own modules, swap
def test_specs_parse_expand_and_refuse_by_name():
    got = iv_lib.parse("route=1, swap,ablate=invariant,invariant-only,specific-only,ablate=0")
    assert [x.name for x in got] == ["route=1", "swap", "ablate=invariant", "invariant-only", "specific-only",
                                     "ablate=0"]
    assert [x.name for x in iv_lib.expand(iv_lib.parse("all,route=1"), 2, True)] == [
        "none", "route=0", "route=1", "swap", "ablate=0", "ablate=1", "ablate=invariant", "invariant-only",
        "specific-only"]
    assert [x.name for x in iv_lib.expand(iv_lib.parse("ablate=1,none,ablate=1"), 2, True)] == ["none", "ablate=1"]
    na = {x.name: iv_lib.not_applicable(x, 1, False) for x in iv_lib.expand([Iv("all")], 1, False)}
    assert na == {"none": "", "route=0": "", "swap": "one specific module: nothing to swap to", "ablate=0": "",
                  "ablate=invariant": "no invariant module", "invariant-only": "no invariant module",
                  "specific-only": "no invariant module"}
    for bad in ("swop", "route=x", "route=", "ablate=inv", "", "swap=1", "route=-1", "all=2"):
        with pytest.raises(ValueError) as e:
            iv_lib.parse(f"swap,{bad}")
        assert str(e.value).startswith(repr(bad)) and "\n" not in str(e.value), str(e.value)
    with pytest.raises(ValueError, match=r"^--intervene route=2: this run has 2 specific module\(s\), M in 0\.\.1$"):
        iv_lib.expand(iv_lib.parse("route=2"), 2, True)


def test_own_module_is_the_majority_route_and_swap_takes_the_next_domains():
    # domain 0 -> mostly module 1, domain 1 -> module 0; a tie goes to the lower module
    assert iv_lib.own_modules(np.array([1, 1, 0, 0, 0, 1]), np.array([0, 0, 0, 1, 1, 1]), 2) == {0: 1, 1: 0}
    assert iv_lib.own_modules(np.array([1, 0]), np.array([0, 0]), 2) == {0: 0}
    assert iv_lib.swap_modules({0: 1, 1: 0}, 2) == {0: 0, 1: 1}           # K = 2: the other module
    assert iv_lib.swap_modules({0: 0, 1: 0}, 2) == {0: 1, 1: 1}           # collapsed router: still the other
    # K = 3, three domains: the next domain (cyclically) whose own module differs
    assert iv_lib.swap_modules({0: 0, 1: 0, 2: 2}, 3) == {0: 2, 1: 2, 2: 0}
    assert iv_lib.swap_modules({0: 2, 1: 0, 2: 1}, 3) == {0: 0, 1: 1, 2: 2}
    assert iv_lib.swap_modules({-1: 2, 0: 1}, 3) == {-1: 0, 0: 2}         # alone, or no domain: own + 1 mod K
    assert iv_lib.swap_modules({0: 0, 1: 0}, 1) is None
    np.testing.assert_array_equal(iv_lib.route_index(Iv("swap"), [1, 0, -1], {0: 1, 1: 0}), [0, 1, 0])
    np.testing.assert_array_equal(iv_lib.route_index(Iv("route", 2), [1, 0], None), [2, 2])
    assert iv_lib.route_index(Iv("ablate", 0), [1, 0], None) is None


def test_report_says_dash_where_an_intervention_means_nothing(tmp_path):
    """A single-module run without an invariant module: swap and the invariant interventions are "-" rows,
    the invariant has no causal effect row, and the verdict of the one module is "-" (it owns both domains)."""
    from iclm_jax import intervention_report as rep
    ivs = iv_lib.expand([Iv("all")], 1, False)
    cell = {"groups": {"all": [3, 4], "symbolic": [1, 2], "text": [2, 2]}, "routed": [2]}
    worse = {"groups": {"all": [1, 4], "symbolic": [0, 2], "text": [1, 2]}, "routed": [2]}
    res = {"score": "teacher", "num_modules": 1, "invariant": False, "aggregator": None, "router_source": "base",
           "interventions": [x.name for x in ivs],
           "not_applicable": {x.name: w for x in ivs if (w := iv_lib.not_applicable(x, 1, False))},
           "own": {"symbolic": 0, "text": 0}, "swap": None,
           "sets": {"a.jsonl": {x.name: (None if iv_lib.not_applicable(x, 1, False) else
                                         worse if x.name == "ablate=0" else cell) for x in ivs}}}
    text = rep.tables({"teacher": res})
    rows = {ln.split("|")[0].strip(): [c.strip() for c in ln.split("|")[1:]] for ln in text.splitlines() if "|" in ln}
    assert rows["a.jsonl: swap"] == ["-"] * 4 and rows["a.jsonl: invariant-only"] == ["-"] * 4
    assert rows["a.jsonl: none"] == ["75.0%", "50.0%", "100.0%", "2"]
    assert rows["a.jsonl: specific 0"] == ["+50.0", "+50.0", "+50.0", "symbolic, text",
                                          "- (it owns every domain with queries)"]
    assert "a.jsonl: invariant" not in rows and "- invariant: - (no invariant module)" in text
    paths = rep.write(str(tmp_path), {"teacher": res})
    assert "swap sends: -" in open(paths[0]).read() and open(paths[1], "rb").read(4) == b"\x89PNG"


# ---------------------------------------------------------------------------- the model-level surgery
def test_forced_route_equals_that_modules_logits():
    """No invariant module: the model's logits are the routed module's, so route=m is module_logits(m).
    With one: route=m under specific-only is module_logits(m) for the logits aggregator, and the concat
    head's closed form (the specific half: RMS(x_m) * scale_spec @ kernel_spec) for concat;
    invariant-only is the invariant half."""
    batch = random_batch(b=6, seed=3)
    model = nonzero_lora_b(tiny_iclm(num_modules=3, invariant=False, router_source="base"), scale=0.5)
    outs = []
    for m in range(3):
        got = np.asarray(iv_lib.logits(model, batch, Iv("route", m)))
        np.testing.assert_array_equal(got, np.asarray(model.module_logits(batch, m)))
        outs.append(got)
    assert min(np.abs(outs[a] - outs[b]).max() for a, b in ((0, 1), (0, 2), (1, 2))) > 1e-3
    for bad, message in ((Iv("ablate", "invariant"), "ablate=invariant: no invariant module"),
                         (Iv("route", 3), "route=3: this run has 3 specific module"),
                         (Iv("swap"), "swap: no swap table")):
        with pytest.raises(ValueError, match=message):
            iv_lib.logits(model, batch, bad)

    model = nonzero_lora_b(tiny_iclm(num_modules=2, aggregator="logits"), scale=0.5)
    spec_only = iv_lib.intervene_model(model, Iv("specific-only"))
    inv_only = iv_lib.intervene_model(model, Iv("invariant-only"))
    for m in range(2):
        np.testing.assert_allclose(iv_lib.logits(spec_only, batch, Iv("route", m)), model.module_logits(batch, m),
                                   rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(iv_lib.logits(inv_only, batch, Iv("route", m)),
                                   model.module_logits(batch, model.cfg.invariant_slot), rtol=1e-6, atol=1e-6)
    assert model.aggregator.invariant_weight == 0.5                     # the original is untouched

    model = nonzero_lora_b(tiny_iclm(num_modules=2), scale=0.5)        # concat
    agg, d = model.aggregator, model.cfg.base.d_model
    scale, kernel = np.asarray(agg.scale[...]), np.asarray(agg.kernel[...])
    x_inv = np.asarray(_rms(model.hidden(batch, jnp.full((6,), 2), train=False), agg.eps))
    spec_only = iv_lib.intervene_model(model, Iv("specific-only"))
    for m in range(2):
        x_m = np.asarray(_rms(model.hidden(batch, jnp.full((6,), m), train=False), agg.eps))
        want = (x_m * scale[d:]) @ kernel[d:]
        np.testing.assert_allclose(iv_lib.logits(spec_only, batch, Iv("route", m)), want, rtol=1e-5, atol=1e-5)
        assert np.abs(want - np.asarray(iv_lib.logits(model, batch, Iv("route", m)))).max() > 1e-3
    np.testing.assert_allclose(iv_lib.logits(model, batch, Iv("invariant-only")), (x_inv * scale[:d]) @ kernel[:d],
                               rtol=1e-5, atol=1e-5)


def test_ablating_an_adapter_equals_the_bare_base_in_its_slot():
    """ablate=m: the rows routed to m take the LoRA layers' adapter -1 path (the bare base, a `where` that
    never reads slot m) as their specific stream; the others are bit-identical. ablate=invariant: the
    invariant stream is the bare base, and the router (source: invariant) reads it."""
    batch = random_batch(b=8, seed=1)
    model = nonzero_lora_b(tiny_iclm(seed=4, num_modules=2), scale=0.5)     # a seed whose router uses both
    routed = np.asarray(model.forward(batch).route.index)
    assert set(routed.tolist()) == {0, 1}, routed
    full = np.asarray(iv_lib.logits(model, batch, Iv("none")))
    for m in range(2):
        h = model.forward(batch, route_index=jnp.asarray(np.where(routed == m, -1, routed)))
        want = np.asarray(model.heads(h.x_inv, h.x_spec)["logits"])
        got = np.asarray(iv_lib.logits(model, batch, Iv("ablate", m)))
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(got[routed != m], full[routed != m])
        assert np.abs(got[routed == m] - full[routed == m]).min(axis=-1).max() > 1e-4

    x_inv = model.hidden(batch, jnp.full((8,), -1), train=False)
    route = model.route(batch, x_inv, train=False)
    want = model.heads(x_inv, model.hidden(batch, route.index, train=False))["logits"]
    np.testing.assert_allclose(iv_lib.logits(model, batch, Iv("ablate", "invariant")), want, rtol=1e-6, atol=1e-6)


def test_surgery_finds_the_adapter_axis_by_name():
    """A stacked-layer layout ([L, M, in, r], names ("layers", "module", ...)): slot 1 is zeroed on axis 1."""
    class Stacked(nnx.Module):
        def __init__(self):
            self.a = LoRAParam(jnp.ones((2, 3, 4, 5)), out_sharding=("layers", "module", "embed", "lora"))
            self.b = LoRAParam(jnp.ones((3, 5, 4)), out_sharding=("module", "lora", "embed"))
    m = Stacked()
    iv_lib.zero_adapter_(m, 1)
    a, b = np.asarray(m.a[...]), np.asarray(m.b[...])
    assert (a[:, 1] == 0).all() and (a[:, [0, 2]] == 1).all()
    assert (b[1] == 0).all() and (b[[0, 2]] == 1).all()


# ---------------------------------------------------------------------------- generation
def test_decode_under_a_forced_route_uses_the_cache_and_never_the_router(monkeypatch):
    """The KV-cached decode with ``route`` equals greedy decoding by the full forward pass with that route,
    token by token; tracing it calls the router zero times (once without ``route``)."""
    model = nonzero_lora_b(tiny_iclm(num_modules=2), scale=0.5)
    calls = []
    real = ICLM.route
    monkeypatch.setattr(ICLM, "route", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    prompts = np.random.default_rng(5).integers(1, 37, size=(4, 7)).astype(np.int32)
    route = np.array([1, 0, 0, 1], np.int32)
    generate._run.clear_cache()
    out = generate.decode(model, prompts, max_new_tokens=3, eos_id=None, pad_id=0, route=route,
                          return_logits=True, pad_multiple=1)
    assert calls == []
    np.testing.assert_array_equal(out.module, route)
    seq = prompts
    for t in range(3):
        b, n = seq.shape
        batch = dict(inputs=seq, positions=np.tile(np.arange(n, dtype=np.int32), (b, 1)),
                     segments=np.ones((b, n), np.int32), prompt_mask=np.ones((b, n), np.float32))
        h = model.forward(batch, route_index=jnp.asarray(route))
        want = np.asarray(model.heads(h.x_inv, h.x_spec)["logits"])[:, -1]
        np.testing.assert_allclose(out.logits[:, t], want, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(out.tokens[:, t], want.argmax(-1))
        seq = np.concatenate([seq, want.argmax(-1)[:, None].astype(np.int32)], axis=1)
    calls.clear()
    generate.decode(model, prompts, max_new_tokens=3, eos_id=None, pad_id=0, pad_multiple=1)
    assert calls == [1]
    with pytest.raises(ValueError, match=r"decode: route must be one int per prompt in \[0, 2\)"):
        generate.decode(model, prompts, max_new_tokens=1, eos_id=None, pad_id=0, route=[0, 2, 0, 0])


# ---------------------------------------------------------------------------- a tiny run, the report
def _config():
    c = tiny_run_config()          # test_generate_score's tiny run
    c.router.mode = "oracle"       # rows go to their domain's module: each module owns one domain
    return c


def _rows(examples, tok, num_slots) -> list[dict]:
    return [pipeline.tokenize_example(ex, tok, 256, num_slots) for ex in examples]


def _stack(rows: list[dict]) -> dict:
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A run directory as ``iclm-train`` leaves it, holding a random tiny ICLM (K = 2, concat, oracle
    router) with nonzero adapters (so the modules differ), and two evals JSONL files of unpacked ACRE
    queries in both renderings. Every other query's ideal is the unintervened model's own answer, so
    accuracies are neither 0 nor 1 and the interventions move them."""
    work = tmp_path_factory.mktemp("iv") / "run"
    c = _config()
    data, model = write_random_run(work, c)
    tok, files = data.tokenizer, []
    for split, seed in (("IID", 11), ("Sys", 12)):
        examples = pipeline.acre_examples(acre_generate.generate_problems(split, "test", 3, seed), packed=False)
        rows = _rows(examples, tok, data.num_slots)
        batch = _stack(rows)
        h = model.forward(batch)
        pred = np.asarray(model.heads(h.x_inv, h.x_spec)["logits"]).argmax(-1)
        for i, r in enumerate(rows):
            at = np.flatnonzero(r["loss_mask"] > 0)[0]        # predicts the answer's (one) content token
            own = " " + tok.decode([int(pred[i, at])])
            if i % 2 == 0 and tok.encode(own) == [int(pred[i, at])]:
                examples[i] = dataclasses.replace(examples[i], answer=own)
        files.append(work.parent / f"{split}.jsonl")
        jsonl.write_jsonl(examples, str(files[-1]))
    return work, files


def _hand_hits(model, rows: list[dict], iv, swap) -> tuple[np.ndarray, np.ndarray]:
    """(per-query exact match, per-query domain) from the intervened logits of stacked rows: a query is right
    when the argmax is the target at every answer target of its slot but the last (its EOS)."""
    pred = np.asarray(iv_lib.logits(model, _stack(rows), iv, swap)).argmax(-1)
    hits, doms = [], []
    for i, r in enumerate(rows):
        for j in range(r["query_type"].shape[0]):
            at = np.flatnonzero((r["answer_slot"] == j) & (r["loss_mask"] > 0))
            if at.size:
                hits.append(bool((pred[i, at[:-1]] == r["targets"][at[:-1]]).all()))
                doms.append(int(r["domain"]))
    return np.array(hits), np.array(doms)


def test_report_numbers_equal_a_hand_computation(tiny_run, tmp_path, capsys):
    work, files = tiny_run
    out, report = tmp_path / "iv.json", tmp_path / "report"
    assert run_eval(["--workdir", str(work), "--data", str(files[0]), "--data", str(files[1]),
                     "--intervene=all", "--report", str(report), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    res = json.loads(out.read_text())["interventions"]["teacher"]
    md = (report / "report.md").read_text()
    assert (report / "interventions.png").read_bytes()[:4] == b"\x89PNG"
    assert printed.split("\n")[0] in md

    run = load_run(str(work))
    model = nnx.merge(run.graphdef, run.state).model
    rows = {f.name: _rows(jsonl.load_jsonl(str(f)), run.data.tokenizer, run.data.num_slots) for f in files}
    # own module per domain: the router's majority over both files' rows; K = 2: swap is the other module
    routed = np.concatenate([np.asarray(model.forward(_stack(rs)).route.index) for rs in rows.values()])
    domain = np.concatenate([[int(r["domain"]) for r in rs] for rs in rows.values()])
    own = {d: int(np.argmax(np.bincount(routed[domain == d], minlength=2))) for d in (0, 1)}
    assert res["own"] == {DOMAINS[d]: m for d, m in own.items()}
    assert res["swap"] == {DOMAINS[d]: 1 - m for d, m in own.items()}
    assert own == {0: 0, 1: 1}         # the oracle router: so every verdict below has a domain of its own

    table = {ln.split("|")[0].strip(): [c.strip() for c in ln.split("|")[1:]] for ln in md.splitlines() if "|" in ln}
    hand = {}
    for name, rs in rows.items():
        for iv in res["interventions"]:
            hit, dom = _hand_hits(model, rs, iv_lib.parse(iv)[0], {0: 1 - own[0], 1: 1 - own[1]})
            counts = {"all": [int(hit.sum()), hit.size]} | {
                DOMAINS[d]: [int(hit[dom == d].sum()), int((dom == d).sum())] for d in (0, 1)}
            assert res["sets"][name][iv]["groups"] == counts, (name, iv)
            hand[name, iv] = {g: h / n for g, (h, n) in counts.items()}
            assert table[f"{name}: {iv}"][:3] == [f"{100 * hand[name, iv][g]:.1f}%" for g in ("all",) + DOMAINS]
        assert table[f"{name}: route=1"][3] == f"0 / {len(rs)}"
    accs = [a["all"] for a in hand.values()]
    assert max(accs) > 0.3 and len(set(accs)) > 3, accs      # the interventions move real numbers
    # causal effects on the pooled sets: drop = acc(none) - acc(ablate), and the verdict read off them
    groups = ("all",) + DOMAINS
    count = {iv: {g: np.sum([res["sets"][n][iv]["groups"][g] for n in rows], axis=0) for g in groups}
             for iv in res["interventions"]}
    pooled = {iv: {g: h / n for g, (h, n) in c.items()} for iv, c in count.items()}
    for m in (0, 1):
        drop = {g: pooled["none"][g] - pooled[f"ablate={m}"][g] for g in groups}
        cells = table[f"all sets: specific {m}"]
        assert cells[:3] == [f"{100 * drop[g]:+.1f}" for g in groups]
        mine = [DOMAINS[d] for d in (0, 1) if own[d] == m]
        if len(mine) == 1:
            a, b = mine[0], [d for d in DOMAINS if d not in mine][0]
            word = "holds" if drop[a] > drop[b] else "does not hold"
            se = np.sqrt(sum(pooled[iv][d] * (1 - pooled[iv][d]) / count[iv][d][1]
                             for iv in ("none", f"ablate={m}") for d in (a, b)))
            gap = drop[a] - drop[b]
            note = f" (within noise: gap {100 * gap:+.1f} < 2 SE = {200 * se:.1f} points)" if abs(gap) < 2 * se else ""
            assert cells[3:] == [a, word + note]
            assert re.search(rf"- specific {m} \(own domain: {a}\): \*\*{word}\*\*", md)
        else:
            assert cells[4].startswith("-")
    assert table["all sets: invariant"][4] == "- (not domain-specific)"


def test_cli_interventions_refuse_bad_specs_in_one_line(tiny_run, capsys):
    work, files = tiny_run
    for args, message in ((["--intervene=swop"], "argument --intervene: 'swop': unknown intervention"),
                          (["--report", "x"], "--report needs --intervene")):
        with pytest.raises(SystemExit) as e:
            run_eval(["--workdir", str(work), "--data", str(files[0]), *args])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and message in err, err
    assert run_eval(["--workdir", str(work), "--data", str(files[0]), "--intervene=route=2"]) == 2
    err = capsys.readouterr().err
    assert err == "iclm-eval: --intervene route=2: this run has 2 specific module(s), M in 0..1\n"


def test_cli_generation_under_interventions(tiny_run, capsys):
    """--score=both with one new token: under a forced route a generation is the argmax at the last prompt
    position, where teacher forcing reads its one-token answer, so the two scores' accuracies agree; every
    query goes to the forced module (the router is not asked)."""
    work, files = tiny_run
    assert run_eval(["--workdir", str(work), "--data", str(files[0]), "--score=both", "--max_new_tokens=1",
                     "--intervene=route=0,route=1"]) == 0
    out = capsys.readouterr().out
    rows = {}
    for block in out.split("Accuracy under interventions (")[1:]:
        rows[block.split(")")[0]] = {ln.split("|")[0].strip(): [c.strip() for c in ln.split("|")[1:]]
                                     for ln in block.splitlines() if ln.startswith(files[0].name)}
    gen, teacher = rows["exact match of greedy generations"], rows["teacher-forced exact match"]
    n = 3 * 2 * 4                  # problems x renderings x queries, one row each
    assert gen["IID.jsonl: route=0"][3] == f"{n} / 0" and gen["IID.jsonl: route=1"][3] == f"0 / {n}"
    for m in (0, 1):
        assert gen[f"IID.jsonl: route={m}"][:3] == teacher[f"IID.jsonl: route={m}"][:3]
