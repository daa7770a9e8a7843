"""ACRE format, label rule (against brute-force enumeration), generator invariants, errors, CLI."""
import copy
import json
import random
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest

from iclm_jax.data import acre
from iclm_jax.data.acre import (
    PARTS,
    QUERY_TYPES,
    SPLITS,
    AcreFormatError,
    check_problems,
    derive_label,
    load_problems,
    save_problems,
    split_objects,
)
from iclm_jax.data.acre_generate import generate_problems, object_roles

# Three problems from the released IID validation file, verbatim (issue 3).
VERBATIM = """[
[{"light_state":"on","objects":[36,24]},{"light_state":"off","objects":[24]},{"light_state":"on","objects":[36]},{"light_state":"on","objects":[47,39,22,28,38]},{"light_state":"off","objects":[38,25,22,28]},{"light_state":"off","objects":[28,22]},{"light_state":"no","objects":[38],"label":0,"type":"screen_off"},{"light_state":"no","objects":[39],"label":1,"type":"potential"},{"light_state":"no","objects":[24,22],"label":0,"type":"screen_off","ref":1},{"light_state":"no","objects":[24,38],"label":0,"type":"screen_off","ref":1}],
[{"light_state":"on","objects":[18,9]},{"light_state":"on","objects":[18]},{"light_state":"off","objects":[9]},{"light_state":"on","objects":[34,46]},{"light_state":"off","objects":[7,40,19]},{"light_state":"off","objects":[40,7,19,0]},{"light_state":"no","objects":[34],"label":1,"type":"potential"},{"light_state":"no","objects":[40],"label":0,"type":"direct"},{"light_state":"no","objects":[9,34,46],"label":2,"type":"indirect","ref":2},{"light_state":"no","objects":[9,34],"label":1,"type":"potential","ref":2}],
[{"light_state":"off","objects":[46]},{"light_state":"on","objects":[29]},{"light_state":"on","objects":[29,46]},{"light_state":"on","objects":[1,30,24,23]},{"light_state":"off","objects":[35,24,23]},{"light_state":"on","objects":[1,30,24,23]},{"light_state":"no","objects":[35],"label":0,"type":"direct"},{"light_state":"no","objects":[1],"label":1,"type":"potential"},{"light_state":"no","objects":[35,24,23,1],"label":1,"type":"potential","ref":4},{"light_state":"no","objects":[35,24,23,30],"label":1,"type":"potential","ref":4}]
]"""  # noqa: E501


def brute_label(contexts, query):
    """Independent reference: enumerate every blicket assignment with NumPy."""
    objs = sorted({o for c in contexts for o in c["objects"]} | set(query))
    col = {o: i for i, o in enumerate(objs)}
    assign = (np.arange(2 ** len(objs))[:, None] >> np.arange(len(objs))) & 1 == 1

    def lights(objects):
        return assign[:, [col[o] for o in objects]].any(axis=1)

    ok = np.ones(len(assign), bool)
    for c in contexts:
        ok &= lights(c["objects"]) == (c["light_state"] == "on")
    if not ok.any():
        raise ValueError("no consistent assignment")
    q = lights(query)[ok]
    return 2 if q.all() else 0 if not q.any() else 1


def ctx(light, *objs):
    return {"light_state": light, "objects": list(objs)}


def query(objs, label, qtype, ref=None):
    q = {"light_state": "no", "objects": list(objs), "label": label, "type": qtype}
    return q if ref is None else {**q, "ref": ref}


@pytest.fixture(scope="module")
def verbatim():
    return json.loads(VERBATIM)


def test_object_attributes():
    assert acre.object_attributes(0) == ("cube", "gray", "rubber")
    assert acre.object_attributes(36) == ("sphere", "blue", "rubber")
    assert acre.object_attributes(29) == ("cylinder", "cyan", "metal")
    assert acre.object_attributes(47) == ("sphere", "yellow", "metal")
    assert len({acre.object_attributes(i) for i in range(48)}) == 48
    with pytest.raises(ValueError, match="48"):
        acre.object_attributes(48)


def test_verbatim_labels_and_types(verbatim):
    for problem in verbatim:
        ctxs = problem[:6]
        roles, sets = object_roles(ctxs)
        for q in problem[6:]:
            assert derive_label(ctxs, q["objects"]) == q["label"]
            assert brute_label(ctxs, q["objects"]) == q["label"]
            cand = [o for o in q["objects"] if "ref" not in q or o not in ctxs[q["ref"]]["objects"]]
            want = ("indirect", 2) if tuple(sorted(cand)) in sets else roles[cand[0]]
            assert want == (q["type"], q["label"])    # the generator's typing matches the release
    assert check_problems(verbatim) == []


def test_derive_label_matches_enumeration():
    rng = random.Random(0)
    seen, contradictions = Counter(), 0
    for _ in range(1500):
        pool = rng.sample(range(48), rng.randint(2, 10))
        ctxs = [ctx(rng.choice(["on", "off", "off"]),
                    *rng.sample(pool, rng.randint(1, min(4, len(pool))))) for _ in range(6)]
        cands = sorted(set(pool) | {47 - pool[0]})                  # maybe an unseen object
        q = rng.sample(cands, rng.randint(1, min(4, len(cands))))
        try:
            want = brute_label(ctxs, q)
        except ValueError:
            contradictions += 1
            with pytest.raises(ValueError, match="contradictory"):
                derive_label(ctxs, q)
            continue
        assert derive_label(ctxs, q) == want, (ctxs, q)
        seen[want] += 1
    assert min(seen.values()) > 50 and contradictions > 50


def handmade():
    """A (blicket), B, C non-blickets; D blicket by elimination; E, F potential (set {E, F})."""
    A, B, C, D, E, F, G = 3, 10, 17, 40, 25, 33, 44
    ctxs = [ctx("on", A), ctx("off", B), ctx("on", A, B), ctx("on", D, B), ctx("off", C, G),
            ctx("on", E, F, C)]
    queries = [query([A], 2, "direct"), query([C], 0, "direct"), query([D], 2, "indirect"),
               query([B], 0, "screen_off")]
    extra = [query([E], 1, "potential"), query([C, G, E, F], 2, "indirect", ref=4),
             query([B, E], 1, "potential", ref=1), query([B, G], 0, "direct", ref=1)]
    return ctxs, queries, extra


def test_handmade_every_type():
    ctxs, queries, extra = handmade()
    for q in queries + extra:
        assert derive_label(ctxs, q["objects"]) == q["label"] == brute_label(ctxs, q["objects"])
    roles, sets = object_roles(ctxs)
    assert [roles[o] for o in (3, 10, 17, 40, 25, 44)] == [
        ("direct", 2), ("screen_off", 0), ("screen_off", 0), ("indirect", 2), ("potential", 1),
        ("direct", 0)]
    assert sets == [(25, 33)]
    problems = [ctxs + queries, ctxs + extra]
    assert check_problems(problems) == []


def test_checker_reports_disagreements():
    ctxs, queries, extra = handmade()
    bad = copy.deepcopy([ctxs + queries, ctxs + extra])
    bad[1][6]["label"] = 0                      # potential query relabelled off
    bad[0][9]["type"] = "direct"                # screen_off -> direct still fits label 0: fine
    bad[0][8]["type"] = "potential"             # indirect -> potential with label 2: wrong
    bad[1][8]["ref"] = 0                        # an "on" panel
    report = check_problems(bad)
    assert len(report) == 3, report
    assert report[0] == "problem 0, panel 8 [40]: type 'potential' cannot have label 2 (on)"
    assert report[1] == ("problem 1, panel 6 [25]: label 0 (off) but the contexts imply "
                         "1 (undetermined)")
    assert report[2].startswith("problem 1, panel 8") and "ref 0" in report[2]
    contradictory = copy.deepcopy([ctxs + queries])
    contradictory[0][4]["objects"] = [17, 25, 33]      # E, F seen off: on panel 5 unexplained
    assert check_problems(contradictory) == [
        "problem 0: contradictory contexts: 'on' panel 5 [25, 33, 17] holds only objects seen in "
        "'off' panels"]


def test_round_trip(tmp_path, verbatim):
    problems = generate_problems("IID", "val", 30, seed=1)
    problems[0][3]["note"] = "kept"                    # unknown fields survive, in place
    problems[0][8]["extra"] = [1, 2]
    path = tmp_path / "p.json"
    save_problems(problems, path)
    assert load_problems(path) == problems
    text = path.read_text()
    assert text == json.dumps(problems, indent=4)    # the original generator's json.dump style
    assert list(json.loads(text)[0][8]) == [
        "light_state", "objects", "label", "type", "ref", "extra"]
    compact = tmp_path / "verbatim.json"
    compact.write_text(VERBATIM)
    assert load_problems(compact) == verbatim
    save_problems(verbatim, tmp_path / "v2.json")
    assert load_problems(tmp_path / "v2.json") == verbatim


def test_generator_deterministic():
    a = generate_problems("Comp", "train", 40, seed=3)
    assert a == generate_problems("Comp", "train", 40, seed=3)
    assert a != generate_problems("Comp", "train", 40, seed=4)
    assert a != generate_problems("Comp", "val", 40, seed=3)
    assert generate_problems("IID", "test", 0, seed=0) == []
    with pytest.raises(ValueError, match="unknown split"):
        generate_problems("OOD", "train", 1, seed=0)
    with pytest.raises(ValueError, match="unknown part"):
        generate_problems("IID", "dev", 1, seed=0)


def n_on(problem):
    return sum(c["light_state"] == "on" for c in problem[:6])


@pytest.mark.parametrize("split", SPLITS)
def test_generated_problems_follow_the_recipe(split):
    for part in PARTS:
        problems = generate_problems(split, part, 300, seed=7)
        assert len(problems) == 300 and check_problems(problems) == []
        allowed = set(split_objects(split, part))
        for p in problems[:60]:                      # independent labels for a subset
            for q in p[6:]:
                assert brute_label(p[:6], q["objects"]) == q["label"]
        used = set()
        for p in problems:
            for panel in p:
                assert 1 <= len(panel["objects"]) <= 6
                assert len(set(panel["objects"])) == len(panel["objects"])
                used |= set(panel["objects"])
            # habituation A+, B-, AB+ among the contexts
            singles = {(c["light_state"], c["objects"][0]) for c in p[:6] if len(c["objects"]) == 1}
            assert any(("on", a) in singles and ("off", b) in singles
                       for c in p[:6] if c["light_state"] == "on" and len(c["objects"]) == 2
                       for a, b in (c["objects"], c["objects"][::-1]))
            assert all(len(q["objects"]) == 1 and "ref" not in q for q in p[6:8])
            for q in p[8:]:
                ref = p[q["ref"]]
                assert ref["light_state"] == "off"
                assert q["objects"][:len(ref["objects"])] == ref["objects"]
                assert len(q["objects"]) > len(ref["objects"])
        assert used <= allowed
        ons = Counter(map(n_on, problems))
        if split == "Sys":
            assert ons == {3 if part == "train" else 4: 300}
        else:
            assert ons == {3: 150, 4: 150}
        if split in ("IID", "Sys"):
            assert used == set(range(48))


def test_split_objects():
    assert split_objects("IID", "train") == tuple(range(48)) == split_objects("Sys", "test")
    for part in PARTS:
        assert split_objects("Comp", part) == tuple(range(24))
    train, val, test = (set(split_objects("CompHeldout", p)) for p in PARTS)
    assert train == val and not train & test and train | test == set(range(48))
    assert len(test) == 16
    for k in range(3):                               # shape, color, material
        values = lambda objs: {acre.object_attributes(o)[k] for o in objs}  # noqa: E731
        assert values(train) == values(test) == values(range(48))
    for a, b in [(0, 1), (0, 2), (1, 2)]:            # every attribute pair is seen in training
        pairs = lambda objs: {  # noqa: E731
            (acre.object_attributes(o)[a], acre.object_attributes(o)[b]) for o in objs}
        assert pairs(train) == pairs(range(48))


def type_shares(problems):
    c = Counter(q["type"] for p in problems for q in p[6:])
    return {t: c[t] / sum(c.values()) for t in QUERY_TYPES}


def test_query_type_proportions():
    target = {"direct": 0.37, "indirect": 0.12, "screen_off": 0.24, "potential": 0.27}
    iid = type_shares(generate_problems("IID", "test", 2000, seed=0))
    pooled = type_shares([p for s in ("IID", "Comp", "Sys")
                          for p in generate_problems(s, "test", 2000, seed=0)])
    for t in QUERY_TYPES:
        assert abs(iid[t] - target[t]) < 0.02, iid
        assert abs(pooled[t] - target[t]) < 0.015, pooled


def write(tmp_path, obj, name="bad.json"):
    path = tmp_path / name
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return str(path)


def mutate(problem_index, panel_index, fn):
    def go(problems):
        problem = problems[problem_index]
        fn(problem if panel_index is None else problem[panel_index])
        return problems
    return go


BAD_CASES = {
    "panel count": (mutate(1, None, lambda p: p.pop()), 1, None, "has 9 panels"),
    "one panel": (mutate(2, None, lambda p: p.clear() or p.append({})), 2, None, "has 1 panels"),
    "context light": (mutate(1, 2, lambda q: q.update(light_state="no")), 1, 2, "context panel"),
    "query light": (mutate(0, 7, lambda q: q.update(light_state="on")), 0, 7, "query panel"),
    "object range": (mutate(2, 3, lambda q: q["objects"].append(48)), 2, 3, "object id 48"),
    "object negative": (mutate(2, 3, lambda q: q["objects"].append(-1)), 2, 3, "object id -1"),
    "object float": (mutate(0, 0, lambda q: q["objects"].append(3.0)), 0, 0, "object id 3.0"),
    "object string": (mutate(0, 6, lambda q: q.update(objects=["5"])), 0, 6, "object id '5'"),
    "object bool": (mutate(0, 6, lambda q: q.update(objects=[True])), 0, 6, "object id True"),
    "no objects": (mutate(1, 4, lambda q: q.update(objects=[])), 1, 4, "1..6 ids"),
    "seven objects": (mutate(1, 4, lambda q: q.update(objects=list(range(7)))), 1, 4, "1..6 ids"),
    "repeated object": (mutate(1, 4, lambda q: q.update(objects=[5, 5])), 1, 4, "repeated"),
    "unknown label": (mutate(2, 9, lambda q: q.update(label=3)), 2, 9, "unknown label 3"),
    "label string": (mutate(2, 9, lambda q: q.update(label="on")), 2, 9, "unknown label 'on'"),
    "unknown type": (mutate(1, 8, lambda q: q.update(type="cause")), 1, 8, "unknown type 'cause'"),
    "missing label": (mutate(0, 9, lambda q: q.pop("label")), 0, 9, "missing field 'label'"),
    "missing objects": (mutate(0, 1, lambda q: q.pop("objects")), 0, 1, "missing field 'objects'"),
    "missing light": (mutate(0, 1, lambda q: q.pop("light_state")), 0, 1, "field 'light_state'"),
    "bad ref": (mutate(0, 8, lambda q: q.update(ref=7)), 0, 8, "ref 7"),
    "panel not object": (mutate(1, 5, lambda q: q.clear()), 1, 5, "missing field"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_problems(tmp_path, verbatim, case):
    fn, i, j, text = BAD_CASES[case]
    path = write(tmp_path, fn(copy.deepcopy(verbatim)))
    with pytest.raises(AcreFormatError) as err:
        load_problems(path)
    e = err.value
    assert (e.path, e.problem_index, e.panel_index) == (path, i, j)
    where = f"problem {i}" + ("" if j is None else f", panel {j}")
    assert str(e).startswith(f"{path}: {where}: ") and text in str(e), str(e)
    with pytest.raises(AcreFormatError):                # saving refuses the same problems
        save_problems(fn(copy.deepcopy(verbatim)), tmp_path / "out.json")


@pytest.mark.parametrize("content,text", [
    ("", "file is empty"), ("  \n", "file is empty"), ("[]", "no problems"),
    ('{"a": 1}', "top level must be a JSON array"),
    ("[[1, 2]", "malformed JSON at line 1, column 8"),
    ('[\n  [{"light_state": "on",}]\n]', "malformed JSON at line 2, column 25"),
    ("[1]", "problem 0: a problem must be an array"),
    ('[[1,2,3,4,5,6,7,8,9,10]]', "problem 0, panel 0: panel must be a JSON object"),
])
def test_bad_files(tmp_path, content, text):
    path = write(tmp_path, content)
    with pytest.raises(AcreFormatError, match=text) as err:
        load_problems(path)
    assert err.value.path == path and str(err.value).startswith(path)


def test_missing_file(tmp_path):
    with pytest.raises(AcreFormatError, match="cannot read"):
        load_problems(tmp_path / "nope.json")


def cli(*args):
    return subprocess.run([sys.executable, "-m", "iclm_jax.data.acre", *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def test_cli(tmp_path):
    out = tmp_path / "acre" / "Sys" / "test.json"
    r = cli("generate", "--split", "Sys", "--part", "test", "--n", 50, "--seed", 5, "--out", out)
    assert r.returncode == 0, r.stderr
    assert "wrote 50 Sys/test problems" in r.stdout and "screen_off" in r.stdout
    problems = load_problems(out)
    assert problems == generate_problems("Sys", "test", 50, seed=5)
    r = cli("check", out)
    assert r.returncode == 0 and "OK, 50 problems" in r.stdout, r.stdout + r.stderr
    r = cli("stats", out)
    assert r.returncode == 0 and "50 problems, 200 queries" in r.stdout

    lab = problems[12][7]["label"]
    problems[12][7]["label"] = (lab + 1) % 3
    corrupt = tmp_path / "corrupt.json"
    save_problems(problems, corrupt)
    r = cli("check", out, corrupt)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert f"{out}: OK" in r.stdout
    assert f"{corrupt}: problem 12, panel 7" in r.stdout
    assert "1 disagreement(s) in 1 of 50 problems" in r.stdout

    bad = write(tmp_path, "[[1, 2]")
    r = cli("check", bad)
    assert r.returncode == 1 and "Traceback" not in r.stdout + r.stderr
    assert r.stdout.strip() == f"FORMAT ERROR {bad}: malformed JSON at line 1, column 8: " \
                               "Expecting ',' delimiter"
    r = cli("stats", bad)
    assert r.returncode == 1 and "Traceback" not in r.stderr and "malformed JSON" in r.stderr
