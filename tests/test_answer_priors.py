"""What keeps a number from flattering: the answer prior beside evals-JSONL results, no router purity where
there is one domain, and a refusal when the tokenizer does not know a file's words."""
import numpy as np
import pytest

from iclm_jax import evaluate
from iclm_jax.data import sources
from iclm_jax.data.reference import fit_majority_answer, score_majority_answer
from iclm_jax.data.render import Example, PackedExample
from tests.test_step import acre_cfg


def test_majority_answer_per_domain_against_a_hand_count():
    train = [Example("a", " yes", 0), Example("b", " yes", 0), Example("c", " no", 0), Example("d", " no", 1),
             PackedExample("p", (("q1", " no"), ("q2", " maybe")), 1, (0, 0), (0, 0))]
    table = fit_majority_answer(train)
    assert table == {0: "yes", 1: "no", "all": "no"}            # "no" 3 times overall, "yes" twice
    test = [Example("x", " yes", 0), Example("y", " no", 0), Example("z", " no", 1), Example("w", " no", 5)]
    assert score_majority_answer(table, test) == {"all": 0.75}  # domain 5 unseen: the overall answer
    assert score_majority_answer(table, []) == {}


def test_purity_is_no_number_with_one_labelled_domain():
    res = {"correct": np.ones((4, 1), bool), "present": np.ones((4, 1), bool), "query_type": np.zeros((4, 1), int),
           "module": np.array([0, 1, 0, 1]), "domain": np.array([1, 1, 1, -1])}
    one = evaluate.summarise(res, 2)
    assert np.isnan(one["purity"])
    row = evaluate.modules_table({"s": one}, 2).splitlines()[-1]
    assert [c.strip() for c in row.split("|")] == ["s", "-", "100.0%", "100.0%", "100.0%", "2 / 2", "-"]
    res["domain"] = np.array([0, 1, 0, 1])
    assert evaluate.summarise(res, 2)["purity"] == 1.0


def test_a_file_the_tokenizer_does_not_know_is_refused_naming_a_tokenizer_that_fits(tmp_path):
    path = tmp_path / "foreign.jsonl"
    path.write_text('{"input": "Does smoking cause cancer?", "ideal": "yes"}\n'
                    '{"input": "on off", "ideal": "on"}\n')
    c = acre_cfg.get_config()
    c.data.train_file, c.data.eval_splits = str(path), ""
    with pytest.raises(ValueError, match=rf"^{path}: \d+% of its tokens are <unk> under data.tokenizer='acre_word' "
                                         r"\(above data.max_unk=0.05\).*use data.tokenizer=smollm2"):
        sources.build(c.data, 0)
    c.data.max_unk = 1.0                                         # accepted on request
    assert len(sources.build(c.data, 0).train_examples) == 2
