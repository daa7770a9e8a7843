"""Generation-based scoring (``generate_score``, ``iclm-eval --score``): the metrics on hand-computed cases,
the per-query prompts against the rows the model is evaluated on, generated vs teacher-forced exact match
on one tiny model, and the command line."""
import dataclasses
import math

import numpy as np
import pytest
from flax import nnx

from iclm_jax import evaluate
from iclm_jax import generate_score as gs
from iclm_jax.data import acre, acre_generate, jsonl, pipeline
from iclm_jax.eval_main import run_eval
from iclm_jax.train.run import load_run
from tests.helpers import write_random_run
from tests.test_step import acre_cfg


# ---------------------------------------------------------------------------- metrics, by hand
def test_exact_match_ignores_case_and_outer_whitespace_only():
    assert gs.exact_match("off", " off") and gs.exact_match(" On\n", "on") and gs.exact_match("a  b", "a b")
    assert not gs.exact_match("off.", "off") and not gs.exact_match("off off", "off")
    assert not gs.exact_match("", " off") and gs.exact_match("", "  ")


def test_partial_match_is_the_generation_as_whole_words_inside_the_ideal():
    # The official direction: prediction inside label (re.search(r'\b(pred)\b', label)).
    assert gs.partial_match("light", "the light is on") and gs.partial_match("is on", "The light IS on")
    assert not gs.partial_match("the light is on", "on")        # the ideal inside the generation: no
    assert not gs.partial_match("ligh", "the light is on")      # whole words only
    assert gs.partial_match("on", "on") and not gs.partial_match("off", "on")
    assert not gs.partial_match("", "on") and not gs.partial_match("  ", "on")   # empty never matches
    assert not gs.partial_match("o.", "on") and gs.partial_match("[1]", "x [1] y")   # literal, not a regex


def test_last_word_match_compares_the_last_words_only():
    # RAVEN worked answers: the letter after the model's own panel counts, right panel or not.
    assert gs.last_word_match(" t4 s3 c2 C", "t4 s3 c2 c") and gs.last_word_match("t1 s1 c1 C\n", " t4 s3 c2 C")
    assert not gs.last_word_match(" t4 s3 c2 B", " t4 s3 c2 C") and not gs.last_word_match("t4 s3 c2", " t4 s3 c2 C")
    assert gs.last_word_match("off", " off") and not gs.last_word_match("on", " off")   # one word: exact match
    assert not gs.last_word_match("", " C") and not gs.last_word_match("  ", " C") and not gs.last_word_match("C", "")


def test_token_f1_is_squads():
    assert gs.token_f1("the cat sat", "cat sat down") == pytest.approx(0.8)   # P = 2/2, R = 2/3
    assert gs.token_f1("The Cat.", "cat") == 1.0            # case, punctuation, articles dropped
    assert gs.token_f1("on on", "on") == pytest.approx(2 / 3)     # P = 1/2, R = 1
    assert gs.token_f1("", "on") == 0.0 and gs.token_f1("on", "") == 0.0
    assert gs.token_f1("", "") == 1.0 and gs.token_f1("the", "a") == 1.0   # both empty after normalising


def test_binary_f1_of_the_positive_class():
    # TP = 1 (0), FP = 1 (1), FN = 1 (2), TN = 1 (3): 2 / (2 + 1 + 1)
    assert gs.binary_f1([1, 1, 0, 0], [1, 0, 1, 0]) == 0.5
    assert gs.binary_f1([1, 0], [1, 0]) == 1.0
    assert gs.binary_f1([0, 0], [1, 1]) == 0.0                    # positives all missed
    assert gs.binary_f1([1, 0], [0, 0]) == 0.0                    # all-negative labels, one false alarm
    assert math.isnan(gs.binary_f1([0, 0], [0, 0]))               # all negative, none predicted: undefined
    assert math.isnan(gs.binary_f1([], []))
    with pytest.raises(ValueError, match="3 predictions for 2 labels"):
        gs.binary_f1([1, 0, 1], [1, 0])


def test_score_records_groups_and_f1_kinds():
    def rec(gen, ideal, domain, qtype, label):
        return dict(generation=gen, ideal=ideal, domain=domain, query_type=qtype, label=label)
    records = [rec("on", "on", 1, 0, 2),          # direct, text: TP
               rec("on", "off", 1, 0, 0),         # direct, text: FP
               rec("2", "2", 0, 1, 2),            # indirect, symbolic: TP ("2" says on in symbolic)
               rec("0", "0", 0, 2, 0),            # screen_off, symbolic: TN
               rec("on", "undetermined", 1, 3, 1)]   # potential: not binary
    g = gs.score_records(records)
    assert set(g) == {"all", "direct", "indirect", "screen_off", "potential", "domain_symbolic", "domain_text"}
    assert g["all"]["queries"] == 5 and g["all"]["exact"] == pytest.approx(3 / 5)
    assert g["all"]["partial"] == pytest.approx(3 / 5) and g["all"]["f1_kind"] == "binary"
    assert g["all"]["last_word"] == g["all"]["exact"]         # one-word ideals: the same
    worked = gs.score_records([rec(g, " t4 s3 c2 B", 0, -1, -1)
                               for g in (" t1 s2 c3 B", " t4 s3 c2 A", " t4 s3 c2 B", "")])
    assert worked["all"]["exact"] == pytest.approx(1 / 4) and worked["all"]["last_word"] == pytest.approx(2 / 4)
    # RAVEN: the label is the target letter's index (B = 1; A = 0 and C = 2 look like ACRE's off / on), no query
    # type: token F1, never ACRE's on-vs-off F1
    for letter in (0, 2):
        raven = gs.score_records([rec(" t4 s3 c2 A", " t4 s3 c2 A", 0, -1, letter)])
        assert raven["all"]["f1_kind"] == "token" and raven["all"]["f1"] == 1.0
    assert g["all"]["f1"] == pytest.approx(2 * 2 / (2 * 2 + 1))          # TP 2, FP 1, FN 0
    assert g["direct"]["f1"] == pytest.approx(2 / 3) and g["indirect"]["f1"] == 1.0
    assert math.isnan(g["screen_off"]["f1"]) and math.isnan(g["potential"]["f1"])   # no positives / no binary
    assert g["domain_text"]["exact"] == pytest.approx(1 / 3) and g["domain_symbolic"]["exact"] == 1.0
    # No ACRE labels (an evals file without them): mean token F1, no query types or domains.
    plain = gs.score_records([rec("the cat sat", "cat sat down", -1, -1, -1), rec("", "x", -1, -1, -1)])
    assert set(plain) == {"all"} and plain["all"]["f1_kind"] == "token"
    assert plain["all"]["f1"] == pytest.approx(0.4) and plain["all"]["exact"] == 0.0


# ---------------------------------------------------------------------------- prompts and a tiny run
def _config():
    c = acre_cfg.get_config()
    c.model.update(d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=8, mlp_dim=32)
    c.lora.rank = 2
    c.mi.critic_hidden = 16
    c.eval.batch_size = 8
    c.data.update(train_problems=4, eval_problems=2, eval_splits="")
    return c


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A run directory as ``iclm-train`` leaves it (config, data.json, tokenizer, a checkpoint), holding a
    random tiny model with nonzero adapters (so the modules differ), without the training steps' time."""
    work = tmp_path_factory.mktemp("gen") / "run"
    c = _config()
    write_random_run(work, c)
    return work


def test_query_prompts_are_the_tokens_before_each_answer_in_the_row(tiny_run):
    """Packed row: query j's prompt is [bos] prefix + query j (segment 1, then segment 2+j), the inputs
    query j's answer is predicted from."""
    tok = load_run(str(tiny_run)).data.tokenizer
    problems = acre_generate.generate_problems("IID", "test", 2, 3)
    for packed in (True, False):
        examples = pipeline.acre_examples(problems, styles=("symbolic", "text"), packed=packed)
        prompts = iter(gs.query_prompts(examples, tok))
        for ex in examples:
            row = pipeline.tokenize_example(ex, tok, 512, 4)
            seg, ids, asked = row["segments"], row["inputs"], row["prompt_mask"] > 0
            answers = [a for _, a in ex.queries] if packed else [ex.answer]
            for j, answer in enumerate(answers):
                p = next(prompts)
                mine = asked & ((seg == 1) | (seg == 2 + j)) if packed else asked
                assert list(p.tokens) == ids[mine].tolist()
                last = np.flatnonzero(mine)[-1]       # predicts the answer's first token, in slot j
                assert row["targets"][last] == tok.encode(answer)[0] and row["answer_slot"][last] == j
                assert p.ideal == answer and p.domain == ex.domain
        assert next(prompts, None) is None


def test_generated_exact_match_equals_teacher_forced_on_single_token_answers(tiny_run):
    """With one new token, a generation is the argmax at the last prompt position: the position and inputs
    (unpacked rows: the same [bos] prompt, so the same routing) at which teacher forcing reads its argmax for
    a one-token answer (its EOS target is not scored). So the two exact matches agree query by query. Ideals
    are the model's own greedy answer on even queries and another word on odd ones, so both outcomes occur."""
    run = load_run(str(tiny_run))
    tok = run.data.tokenizer
    model = nnx.merge(run.graphdef, run.state).model
    problems = acre_generate.generate_problems("IID", "test", 3, 7)
    examples = pipeline.acre_examples(problems, styles=("symbolic", "text"), packed=False)
    greedy, _ = gs.generate_answers(model, gs.query_prompts(examples, tok), tok, max_new_tokens=1, batch_size=8)
    ideals = []
    for i, g in enumerate(greedy):
        own = i % 2 == 0 and g and len(tok.encode(" " + g)) == 1
        ideals.append(" " + g if own else (" off" if g != "off" else " on"))
    assert all(len(tok.encode(a)) == 1 for a in ideals)
    examples = [dataclasses.replace(ex, answer=a) for ex, a in zip(examples, ideals)]

    gen = gs.score_examples(model, examples, tok, max_new_tokens=1, batch_size=8)
    gen_exact = np.array([gs.exact_match(r["generation"], r["ideal"]) for r in gen["records"]])
    res = evaluate.run_eval_set(run.eval_step, run.state, examples, tok=tok, mesh=run.mesh, rules=run.rules,
                                max_len=run.data.max_len, num_slots=run.data.num_slots, batch_size=8)
    present = res["present"][:, 0]
    teacher_exact = res["correct"][:, 0][present]
    assert present.sum() == len(examples) == len(gen_exact)
    assert 0 < gen_exact.sum() < len(gen_exact)          # both outcomes: a real comparison
    np.testing.assert_array_equal(gen_exact, teacher_exact)
    teacher = evaluate.summarise(res, run.num_modules)
    for group, g in gen["groups"].items():
        assert g["exact"] == pytest.approx(teacher[group]), group
        assert g["last_word"] == g["exact"], group          # one-word answers: the last word is the answer


def test_cli_generate_prints_the_table_and_bad_flags_exit_2(tiny_run, tmp_path, capsys):
    problems = acre_generate.generate_problems("Sys", "test", 2, 5)
    release = tmp_path / "test.json"
    acre.save_problems(problems, release)
    as_jsonl = tmp_path / "test.jsonl"
    jsonl.write_jsonl(pipeline.acre_examples(problems, styles=("text",), packed=False), as_jsonl)
    rc = run_eval(["--workdir", str(tiny_run), "--data", str(release), "--data", str(as_jsonl),
                   "--score=generate"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "Generated answers (greedy, up to EOS or 5 new tokens): exact / partial match, last word" in out
    for row in ("test.json: all", "test.json: direct", "test.json: domain symbolic", "test.json: domain text",
                "test.jsonl: all", "test.jsonl: domain text"):
        assert row in out, out
    assert "test.jsonl: domain symbolic" not in out and "on vs off" in out
    assert "Answer accuracy (exact match)" not in out       # generate only: no teacher-forced tables
    lines = {ln.split("|")[0].strip(): [c.strip() for c in ln.split("|")[1:]] for ln in out.splitlines() if "|" in ln}
    assert lines["test.json: all"][0] == str(2 * 2 * 4)    # 2 problems x 2 renderings x 4 queries
    assert lines["test.jsonl: all"][0] == str(2 * 4)

    for bad, message in ((["--score=sample"], "argument --score: invalid choice: 'sample'"),
                         (["--max_new_tokens=-1"], "--max_new_tokens: -1: expected an integer >= 1")):
        with pytest.raises(SystemExit) as e:
            run_eval(["--workdir", str(tiny_run), "--data", str(release), *bad])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("iclm-eval: ") and message in err, err
