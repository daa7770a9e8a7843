"""Large training files read on demand (``data.indexed``): the incremental JSON-array scan against
``json.loads``, lazy records against the whole-file loaders, pickling, a file changed under a run, and
memory that does not grow with the file."""
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

from iclm_jax.data import acre, acre_generate, jsonl, pipeline
from iclm_jax.data.indexed import ArrayFormatError, ChangedFile, json_array_elements
from iclm_jax.data.rendered import RenderedProblems

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def problems():
    return acre_generate.generate_problems("IID", "train", 12, 3)


VALUES = [12345, -1.5e3, "é€😀 \"q\" \\n", None, True, {"a": [1, {"b": "x"}]}, [[]], 0, [], 7e-8]


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 1 << 20])
@pytest.mark.parametrize("indent", [None, 4])
def test_array_scan_gives_each_element_with_its_byte_range_and_line(tmp_path, chunk, indent):
    """Windows as small as one byte cut numbers ("-1.5e" of -1.5e3), strings and multi-byte characters."""
    path = tmp_path / "a.json"
    for obj in ([], [1], VALUES):
        path.write_text(json.dumps(obj, indent=indent, ensure_ascii=False), encoding="utf-8")
        raw = path.read_bytes()
        out = list(json_array_elements(str(path), chunk))
        assert [v for *_, v in out] == obj
        for start, end, line, value in out:
            assert json.loads(raw[start:end]) == value
            assert raw[:start].count(b"\n") + 1 == line


@pytest.mark.parametrize("text,message,line,column", [
    ("", "file is empty", 1, 1),
    ('{"a": 1}', "top level must be a JSON array", 1, 1),
    ("[1,", "unterminated array", 1, 4),
    ("[1 2]", "expected ',' or ']' after an array element", 1, 4),
    ("[1,]", "malformed JSON: Expecting value", 1, 4),
    ("[1] x", "unexpected data after the array", 1, 5),
    ('[1,\n  {"a": }]', "malformed JSON: Expecting value", 2, 9),
    ("[1.5e]", "expected ',' or ']' after an array element", 1, 5),
])
def test_array_scan_locates_malformed_files(tmp_path, text, message, line, column):
    path = tmp_path / "b.json"
    path.write_text(text)
    with pytest.raises(ArrayFormatError) as e:
        list(json_array_elements(str(path), 2))
    assert (e.value.message, e.value.line, e.value.column) == (message, line, column)
    if text:          # the same position json.loads reports, where it reports one
        try:
            json.loads(text)
        except json.JSONDecodeError as j:
            if "Expecting value" in message:
                assert (j.lineno, j.colno) == (line, column)


def test_indexed_problems_equal_the_whole_file_load_and_pickle_without_their_file(tmp_path, problems):
    path = tmp_path / "train.json"
    acre.save_problems(problems, path)
    lazy = acre.index_problems(path)
    assert len(lazy) == len(problems) and list(lazy) == problems == acre.load_problems(path)
    assert [lazy[i] for i in (5, 0, 11, -1)] == [problems[5], problems[0], problems[11], problems[-1]]
    again = pickle.loads(pickle.dumps(lazy))        # what a grain worker process receives
    assert again._file is None and again[7] == problems[7]
    with pytest.raises(IndexError):
        lazy[12]


def test_rendered_problems_equal_acre_examples_item_by_item(tmp_path, problems):
    for packed, styles in [(True, ("symbolic", "text")), (False, ("text",))]:
        want = pipeline.acre_examples(problems, styles=styles, packed=packed)
        got = RenderedProblems(problems, styles, packed)
        assert len(got) == len(want) and list(got) == want
        order = np.random.default_rng(0).permutation(len(want))       # random access, as grain shuffles
        assert [got[int(i)] for i in order] == [want[int(i)] for i in order]
    named = RenderedProblems(problems, ("text",), True, name="f.json")
    assert named[3].source == "f.json problem 3 text"


def test_indexed_jsonl_equals_load_jsonl_and_names_lines(tmp_path, problems):
    path = tmp_path / "train.jsonl"
    jsonl.write_jsonl(pipeline.acre_examples(problems, packed=False), path)
    with open(path, "a") as f:
        f.write("\n   \n")                                            # blank lines are skipped
    whole, lazy = jsonl.load_jsonl(str(path)), jsonl.index_jsonl(str(path))
    assert list(lazy) == whole and lazy[9] == whole[9] and lazy[9].source == f"{path}:10"
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(path.read_bytes().splitlines(keepends=True)[0] + b'{"input": 3, "ideal": "x"}\n')
    with pytest.raises(jsonl.JsonlError, match=rf"{bad}:2: 'input' must be"):
        jsonl.index_jsonl(str(bad))


def test_indexed_records_read_from_many_threads_at_once_equal_the_whole_file_load(tmp_path, problems):
    """grain reads a source from several threads (ReadOptions.num_threads): records read concurrently from
    one IndexedRecords are the ones a whole-file load gives (a shared seek + read mixed their byte ranges:
    "my.jsonl:2: malformed JSON" in the README's JSONL run)."""
    from concurrent.futures import ThreadPoolExecutor
    path = tmp_path / "train.jsonl"
    jsonl.write_jsonl(pipeline.acre_examples(problems, packed=False), path)
    whole, lazy = jsonl.load_jsonl(str(path)), jsonl.index_jsonl(str(path))
    order = [i % len(whole) for i in range(40 * len(whole))]
    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(lazy.__getitem__, order))
    assert got == [whole[i] for i in order]


def test_a_file_changed_after_indexing_is_refused_by_name(tmp_path, problems):
    path = tmp_path / "train.json"
    acre.save_problems(problems, path)
    lazy = acre.index_problems(path)
    acre.save_problems(problems[:6], path)
    os.utime(path, ns=(1, 1))
    with pytest.raises(ChangedFile, match=f"{path}: changed since it was read"):
        lazy[0]


def test_a_malformed_release_file_is_refused_with_line_and_column(tmp_path):
    path = tmp_path / "train.json"
    path.write_text('[\n  [{"light_state": "on", "objects": [1]}],\n  [oops]\n]')
    with pytest.raises(acre.AcreFormatError, match=r"problem 0: has 1 panels"):
        acre.index_problems(path)
    path.write_text('[\n  {"x": 1},\n  [oops]\n]')
    with pytest.raises(acre.AcreFormatError, match="problem 0: a problem must be an array"):
        acre.index_problems(path)
    path.write_text("[\n  [1,\n")
    with pytest.raises(acre.AcreFormatError, match=r"train.json: malformed JSON: .* at line 3, column 1"):
        acre.index_problems(path)


_MEMORY_SCRIPT = """
import resource, sys
from iclm_jax.data import sources
from iclm_jax.data import tokenizer as tok_lib
from iclm_jax.data.reference import fit_reference
rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
before = rss()
examples, problems = sources.file_examples(sys.argv[1], ("symbolic", "text"), True, lazy=True)
tok = tok_lib.load_tokenizer("acre_word")
longest = sources.measure(4, tok, "train", examples)       # a full pass: parse, render, tokenize
fit_reference(problems)
print(len(examples), longest, rss() - before)
"""


@pytest.mark.slow
def test_memory_does_not_grow_with_the_training_file(tmp_path, problems):
    """A 19 MB release file (15,000 problems) is indexed, rendered, tokenized and counted in one process
    whose peak memory grows by under 25 MiB (measured: 0; the same with the whole-file loader: 117 MiB)."""
    path = tmp_path / "big.json"
    with open(path, "w") as f:
        f.write("[\n")
        for i in range(15000):
            f.write(("    " if i == 0 else ",\n    ") + json.dumps(problems[i % len(problems)], indent=4))
        f.write("\n]\n")
    assert os.path.getsize(path) > 15 * 2**20
    r = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, str(path)], cwd=REPO, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    n, longest, grown_mib = r.stdout.split()
    assert int(n) == 30000 and int(longest) > 100
    assert float(grown_mib) < 25, f"peak RSS grew by {grown_mib} MiB for a {os.path.getsize(path) >> 20} MiB file"
