"""data.task=raven: the RAVEN problems through the same sources -> render -> tokenize -> train -> evaluate path
as ACRE (experiments/configs/raven.py), with its reference predictors and config checks."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from iclm_jax import config_check, evaluate
from iclm_jax.data import raven, raven_generate, raven_reference, raven_render, sources, tasks
from iclm_jax.data.render import DOMAINS
from tests.helpers import one_device_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "experiments", "configs", "raven.py")


def _config(arg=""):
    spec = importlib.util.spec_from_file_location("raven_cfg_test", CONFIG)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config(arg)
    c.data.update(train_problems=12, eval_problems=5)
    return c


def test_build_renders_every_configuration_in_both_domains_without_unknown_words():
    c = _config()
    c.data.max_unk = 0.0                         # raven_word knows every word: no <unk> at all
    data = sources.build(c.data, seed=3)
    problems = raven_generate.generate_problems("center_single", "train", 12, 3)
    assert data.train_problems == problems
    assert [e.prompt for e in data.train_examples] == [raven_render.render_problem(p, s, "compact").prompt
                                                       for p in problems for s in ("symbolic", "text")]
    assert [e.domain for e in data.train_examples[:2]] == [DOMAINS.index("symbolic"), DOMAINS.index("text")]
    assert [es.name for es in data.eval_sets] == list(raven.CONFIGURATIONS)
    for es in data.eval_sets:
        assert len(es.examples) == 10 and all(p["configuration"] == es.name for p in es.problems)
        assert {e.answer for e in es.examples} <= {f" {x}" for x in "ABCDEFGH"}
        assert all(e.label == p["target"] for e, p in zip(es.examples[::2], es.problems))
    assert data.num_slots == 1
    assert data.max_len >= max(sources.row_length(e, data.tokenizer) for es in data.eval_sets for e in es.examples)


def test_a_problem_file_evaluates_like_the_generated_set(tmp_path):
    problems = raven_generate.generate_problems("distribute_four", "test", 4, 0)
    path = tmp_path / "d4.json"
    raven.save_problems(problems, path)
    examples, loaded = sources.file_examples(str(path), ("symbolic", "text"), False, "compact", task="raven")
    assert loaded == problems
    assert examples == tasks.examples("raven", problems, ("symbolic", "text"), False, "compact")


def test_packed_rows_ask_the_unpacked_letter_question_then_the_missing_panels_attributes():
    """The letter query of a packed row is the unpacked question token for token (inputs, positions,
    targets, loss); each attribute answer is the value the problem's rules predict for panel 9 from the
    context alone (``raven_rules.predict``), worded as the row's style words it."""
    from iclm_jax.data import pipeline
    from iclm_jax.data.raven import COLORS, SIZES, TYPES
    from iclm_jax.data.raven_rules import grid_rows, predict, problem_rules, space
    from iclm_jax.data.tokenizer import load_tokenizer
    tok = load_tokenizer("raven_word")
    problems = raven_generate.generate_problems("center_single", "train", 20, 7)
    words = {"type": TYPES, "size": SIZES, "color": COLORS}
    for p in problems:
        predicted = {}
        for c, attr, rule in problem_rules(p):
            rows = grid_rows(p["panels"] + [p["panels"][0]], c, attr)      # panel 9: a placeholder, never read
            predicted[attr] = predict(rule, space("center_single", c, attr), rows[:2], rows[2][:2])
        assert set(predicted) == set(raven_render.ATTRIBUTES)
        for style in DOMAINS:
            flat = raven_render.render_problem(p, style, "compact")
            packed = raven_render.render_packed(p, style, "compact", extra_queries=True)
            assert packed.prefix + packed.queries[0][0] == flat.prompt and packed.queries[0][1] == flat.answer
            assert packed.labels[0] == p["target"]
            for (q, a), code, attr in zip(packed.queries[1:], packed.labels[1:], raven_render.ATTRIBUTES):
                assert q == f"{attr}:" and code == predicted[attr]
                assert a == (f" {attr[0]}{code}" if style == "symbolic" else f" {words[attr][code]}")
            row = pipeline.tokenize_example(packed, tok, 320, 4)
            ref = pipeline.tokenize_example(flat, tok, 320, 1)
            n, end = int((ref["segments"] > 0).sum()), int((row["segments"] == 1).sum()) - 1
            for key in ("inputs", "positions", "targets", "loss_mask"):
                same = row[key][:n] == ref[key][:n]
                if key == "targets":     # the prefix's last target: a placeholder no loss reads (segment ends)
                    same[end] = True
                assert same.all(), key
            assert (row["answer_slot"][:n] == ref["answer_slot"][:n]).all()
            assert row["loss_mask"].sum() == 4 * 2        # four answers, each its word and EOS
    d4 = raven_generate.generate_problems("distribute_four", "test", 3, 0)
    with pytest.raises(ValueError, match="distribute_four answer panel holds .* one-entity panels"):
        next(raven_render.render_packed(q, "text", "compact", True) for q in d4
             if len(q["candidates"][q["target"]]["entities"]) > 1)


def test_build_packs_the_training_rows_with_attribute_queries_and_evaluates_the_letter_only():
    c = _config("cpu,queries")
    c.data.update(max_unk=0.0, val_problems=3)
    data = sources.build(c.data, seed=2)
    assert data.num_slots == 4
    assert {len(e.queries) for e in data.train_examples} == {4}
    for es in data.eval_sets:
        assert {len(e.queries) for e in es.examples} == {1} and len(es.examples) == 2 * len(es.problems)
    flat = tasks.examples("raven", data.eval_sets[1].problems, ("symbolic", "text"), False, "compact")
    assert [e.prefix + e.queries[0][0] for e in data.eval_sets[1].examples] == [e.prompt for e in flat]
    with pytest.raises(ValueError, match="data.extra_queries needs packed rows"):
        tasks.examples("raven", data.train_problems, ("text",), False, "compact", extra_queries=True)


def test_candidate_queries_count_each_candidates_attributes_shared_with_the_answer():
    """``A:`` .. ``H:`` after the attribute queries; each answer counts the attributes (type, size, color)
    a candidate shares with the answer panel, recounted here from the codes. I-RAVEN candidates switch all
    three in center_single, so the counts are one 3 (the target), three 2s, three 1s and one 0."""
    problems = raven_generate.generate_problems("center_single", "train", 30, 4)
    for p in problems:
        ans = p["candidates"][p["target"]]["entities"][0]
        for style in DOMAINS:
            row = raven_render.render_packed(p, style, "compact", extra_queries=("attributes", "candidates"))
            assert row == raven_render.render_packed(p, style, "compact", ("attributes", "candidates"))
            attrs = raven_render.render_packed(p, style, "compact", extra_queries=True)
            assert row.queries[:4] == attrs.queries and row.labels[:4] == attrs.labels
            assert [q for q, _ in row.queries[4:]] == [f"{x}:" for x in "ABCDEFGH"]
            counts = [int(p["candidates"][k]["entities"][0]["type"] == ans["type"])
                      + int(p["candidates"][k]["entities"][0]["size"] == ans["size"])
                      + int(p["candidates"][k]["entities"][0]["color"] == ans["color"]) for k in range(8)]
            assert [a for _, a in row.queries[4:]] == [f" {n}" for n in counts] and list(row.labels[4:]) == counts
            assert counts[p["target"]] == 3 and sorted(counts) == [0, 1, 1, 1, 2, 2, 2, 3]
        only = raven_render.render_packed(p, "text", "compact", ("candidates",))
        assert only.queries[1:] == row.queries[4:]
    with pytest.raises(ValueError, match="data.extra_query_kinds: 'objects' is not one of"):
        raven_render.render_packed(problems[0], "text", "compact", ("objects",))


@pytest.mark.parametrize("form", ["compact", "full"])
def test_echo_queries_write_each_candidate_as_the_prompt_does_and_ask_its_count(form):
    problems = raven_generate.generate_problems("center_single", "train", 10, 5)
    for p in problems:
        for style in DOMAINS:
            row = raven_render.render_packed(p, style, form, ("attributes", "echo"))
            echo = row.queries[4:]
            assert len(echo) == 8
            for k, (q, a) in enumerate(echo):
                assert q.startswith("ABCDEFGH"[k]) and q in row.prefix     # the candidate line's own words
                assert q.endswith(raven_render.render_panel(p["candidates"][k], "center_single", style, form)
                                  + (" |" if form == "compact" else "." if style == "text" else ""))
            counts = raven_render.candidate_queries(p)
            assert [a for _, a in echo] == [a for _, a, _ in counts] and row.labels[4:] == tuple(n for *_, n in counts)


def test_build_with_match_or_echo_asks_twelve_queries_in_training_rows_without_unknown_words():
    for variant, kinds in (("match", "attributes,candidates"), ("echo", "attributes,echo")):
        c = _config(f"cpu,{variant}")
        assert c.data.extra_query_kinds == kinds
        c.data.update(max_unk=0.0)
        data = sources.build(c.data, seed=2)
        assert data.num_slots == 12 and {len(e.queries) for e in data.train_examples} == {12}
        assert {len(e.queries) for es in data.eval_sets for e in es.examples} == {1}
        assert data.max_len >= max(sources.row_length(e, data.tokenizer) for e in data.train_examples)


def _without_angle(candidate: str, style: str, form: str) -> str:
    """A candidate as the prompt writes it, its angle words taken out by hand (the reference for the worked
    answer's panel): compact symbolic drops each ``a<k>`` token, compact text each entity's last number,
    full symbolic each tuple's last code, full text each ``rotated at N degrees``."""
    import re
    if form == "compact":
        words = candidate.split()
        if style == "symbolic":
            return " ".join(w for w in words if not re.fullmatch(r"a\d", w))
        return " ".join(w for w in words if not re.fullmatch(r"-?\d+", w))
    if style == "symbolic":
        return re.sub(r", \d+\)", ")", candidate)
    return re.sub(r" rotated at -?\d+ degrees", "", candidate).rstrip(".")


@pytest.mark.parametrize("form", ["compact", "full"])
@pytest.mark.parametrize("configuration", raven.CONFIGURATIONS)
def test_worked_answers_write_the_missing_panel_without_angles_then_its_letter(configuration, form):
    """``worked``: the answer is the target candidate as the prompt's candidate line writes it, less its angles
    (noise), then its letter; the prompt is the letter question's, token for token, in every configuration."""
    for p in raven_generate.generate_problems(configuration, "test", 6, 7):
        for style in DOMAINS:
            plain = raven_render.render_problem(p, style, form)
            worked = raven_render.render_problem(p, style, form, worked=True)
            assert (worked.prompt, worked.label, worked.domain) == (plain.prompt, plain.label, plain.domain)
            letter = "ABCDEFGH"[p["target"]]
            lines = plain.prompt.split("\n")
            if form == "compact":
                cands = [c.strip() for c in lines[-2].split("|")[:8]]
                shown = cands[p["target"]][2:]                      # "C t4 s3 c2 a5" -> "t4 s3 c2 a5"
            else:
                shown = lines[-9 + p["target"]].split(": ", 1)[1]
            assert worked.answer == f" {_without_angle(shown, style, form)} {letter}", (configuration, style, form)
            assert worked.answer.endswith(plain.answer)
            packed = raven_render.render_packed(p, style, form, worked=True)
            assert packed.queries[0][1] == worked.answer and packed.prefix + packed.queries[0][0] == worked.prompt
    one = raven_generate.generate_problems("center_single", "test", 1, 0)[0]
    ent = one["candidates"][one["target"]]["entities"][0]
    assert raven_render.worked_answer_text(one, "symbolic", "compact") == (
        f" t{ent['type']} s{ent['size']} c{ent['color']} {'ABCDEFGH'[one['target']]}")


@pytest.mark.parametrize("form", ["compact", "full"])
def test_lookup_queries_ask_each_candidates_letter_after_its_panel_as_a_worked_answer_writes_it(form):
    """``lookup``: per candidate, the letter question then the candidate's angle-free panel, answered by its
    letter; the target's query is the worked answer's letter step token for token (its prompt + panel)."""
    for configuration in raven.CONFIGURATIONS:
        for p in raven_generate.generate_problems(configuration, "test", 4, 11):
            for style in DOMAINS:
                row = raven_render.render_packed(p, style, form, ("lookup",), worked=True)
                question, answer = row.queries[0]
                look = row.queries[1:]
                assert [a for _, a in look] == [f" {x}" for x in "ABCDEFGH"] and row.labels[1:] == tuple(range(8))
                for k, (q, _) in enumerate(look):
                    panel = raven_render.render_panel(p["candidates"][k], configuration, style, form, angle=False)
                    assert q == f"{question} {panel}"
                t = p["target"]
                assert look[t][0] + look[t][1] == question + answer        # the worked answer's last step
                assert len({q for q, _ in look}) == 8                     # every candidate's panel differs


def test_build_with_worked_answers_trains_and_evaluates_them_without_unknown_words():
    c = _config("cpu,worked")
    assert c.data.worked_answer and not c.data.packed
    c.data.update(max_unk=0.0, val_problems=3)
    data = sources.build(c.data, seed=2)
    assert data.num_slots == 1
    for name, examples, problems in [("train", data.train_examples, data.train_problems)] + [
            (es.name, es.examples, es.problems) for es in data.eval_sets]:
        want = [raven_render.worked_answer_text(p, s, "compact") for p in problems for s in ("symbolic", "text")]
        assert [e.answer for e in examples] == want, name
    assert data.max_len >= max(sources.row_length(e, data.tokenizer) for es in data.eval_sets for e in es.examples)
    c = _config("cpu,worked,lookup")
    assert (c.data.packed, c.data.extra_queries, c.data.extra_query_kinds) == (True, True, "lookup")
    c.data.update(max_unk=0.0)
    looked = sources.build(c.data, seed=2)
    assert looked.num_slots == 9 and {len(e.queries) for e in looked.train_examples} == {9}
    assert {len(e.queries) for es in looked.eval_sets for e in es.examples} == {1}
    assert [e.queries[0][1] for e in looked.eval_sets[-1].examples] == [e.answer for e in data.eval_sets[-1].examples]
    with pytest.raises(ValueError, match="data.worked_answer: ACRE's answers have no working"):
        tasks.examples("acre", [], ("text",), True, "full", worked=True)


@pytest.mark.parametrize("field,value,message", [
    ("extra_queries", True, "data.extra_queries=True: expected False unless data.packed=True"),
    ("extra_query_kinds", "candidates", "data.extra_query_kinds='candidates': expected empty unless "
     "data.extra_queries=True"),
    ("extra_query_kinds", "panels", "data.extra_query_kinds='panels': expected a comma list from "
     "('attributes', 'candidates', 'echo', 'lookup') (data.task=raven)"),
    ("stream", True, "data.stream=True: expected False: streams generate ACRE only"),
    ("train_split", "IID", "data.train_split='IID': expected one of ('center_single'"),
    ("eval_splits", "center_single,Sys", "data.eval_splits='center_single,Sys': expected a comma list from"),
])
def test_config_check_names_the_field(field, value, message):
    c = _config()
    c.data[field] = value
    with pytest.raises(config_check.ConfigError) as e:
        config_check.validate(c)
    assert message in str(e.value)


def test_the_answer_table_drops_query_type_columns_that_mean_nothing():
    problems = raven_generate.generate_problems("center_single", "test", 40, 1)
    refs = {name: raven_reference.score_reference(p, problems)
            for name, p in raven_reference.fit_reference(problems).items()}
    table = evaluate.results_table({"center_single": {"all": 0.5}}, {"center_single": refs})
    header = table.splitlines()[1]
    assert [h.strip() for h in header.split("|")[1:]] == ["all"] and "best_attribute" in table and "majority" in table
    acre_table = evaluate.results_table({"IID": {"all": 0.5, "direct": 0.7}}, {})
    assert "direct" in acre_table.splitlines()[1] and "indirect" not in acre_table.splitlines()[1]


@pytest.mark.slow
def test_training_on_raven_writes_references_and_every_split(tmp_path):
    work = tmp_path / "run"
    args = ["-m", "iclm_jax.main", f"--config={CONFIG}", f"--workdir={work}", "--quiet",
            "--config.model.d_model=16", "--config.model.n_layers=1", "--config.model.head_dim=8",
            "--config.model.mlp_dim=32", "--config.lora.rank=2", "--config.mi.critic_hidden=16",
            "--config.train.steps=3", "--config.train.batch_size=4", "--config.eval.batch_size=8",
            "--config.data.train_problems=16", "--config.data.eval_problems=4", "--config.mesh.data=1"]
    env = one_device_env()
    r = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((work / "summary.json").read_text())
    assert summary["steps"] == 3 and set(summary["eval"]) == set(raven.CONFIGURATIONS)
    train = raven_generate.generate_problems("center_single", "train", 16, 0)
    for split, res in summary["eval"].items():
        assert 0 <= res["all"] <= 1 and set(res["views"]) >= {"model (router)", "invariant alone"}
        test = raven_generate.generate_problems(split, "test", 4, 1000 + list(raven.CONFIGURATIONS).index(split))
        expected = {k: raven_reference.score_reference(p, test)["all"]
                    for k, p in raven_reference.fit_reference(train).items()}
        assert {k: v["all"] for k, v in summary["reference"][split].items()} == expected
    problems = raven_generate.generate_problems("in_center_single_out_center_single", "test", 6, 5)
    raven.save_problems(problems, tmp_path / "inc.json")          # iclm-eval on a RAVEN problem file
    r = subprocess.run([sys.executable, "-m", "iclm_jax.eval_main", f"--workdir={work}",
                        f"--data={tmp_path / 'inc.json'}", "--score=both", f"--out={tmp_path / 'eval.json'}"],
                       cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads((tmp_path / "eval.json").read_text())
    assert set(out["reference"]["inc.json"]) == {"majority", "best_attribute"}
    assert out["teacher"]["inc.json"]["all"] >= 0 and "inc.json" in out["generate"]
    gen = out["generate"]["inc.json"]
    assert gen["groups"]["all"]["f1_kind"] == "token"       # a letter's index is not an ACRE on/off label
    # the letter after the model's own panel: the last whitespace-separated word, case-insensitive
    letters = [bool(r["generation"].split()) and r["generation"].split()[-1].lower() == r["ideal"].split()[-1].lower()
               for r in gen["records"]]
    assert len(letters) == 2 * 6 and gen["groups"]["all"]["last_word"] == pytest.approx(sum(letters) / 12)  # 2 styles
