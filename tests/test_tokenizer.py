"""Tokenizers: word-level round trip and coverage of ACRE, save/load, SmolLM2 parity with transformers."""
from __future__ import annotations

import json
import os

import pytest
import tokenizers

from iclm_jax.data import acre_generate, render
from iclm_jax.data.tokenizer import (
    acre_word_tokenizer,
    build_word_tokenizer,
    load_tokenizer,
    smollm2_gguf_path,
    smollm2_tokenizer,
)

SPLITS = ("IID", "Sys", "Comp", "CompHeldout")


def test_word_tokenizer_specials_and_round_trip():
    texts = ["the cat sat", "a dog, the cat!"]
    tok = build_word_tokenizer(texts)
    assert (tok.pad_id, tok.eos_id, tok.bos_id) == (0, 1, 3)
    assert [tok.token_to_id(t) for t in ("<pad>", "<eos>", "<unk>", "<bos>")] == [0, 1, 2, 3]
    assert tok.vocab_size == 4 + len({"the", "cat", "sat", "a", "dog", ",", "!"})
    assert build_word_tokenizer(texts[::-1]).tk.get_vocab() == tok.tk.get_vocab()   # order-free
    ids = tok.encode("a dog, the cat!")
    assert tok.decode(ids) == "a dog , the cat !"
    assert tok.encode(tok.decode(ids)) == ids
    assert tok.encode("the zebra") == [tok.token_to_id("the"), 2]                   # <unk>
    assert tok.decode([3] + ids + [1, 0, 0]) == tok.decode(ids)                     # specials dropped


def test_save_load_identical(tmp_path):
    tok = acre_word_tokenizer()
    tok.save(str(tmp_path / "tok"))
    for path in (tmp_path / "tok", tmp_path / "tok" / "tokenizer.json"):
        again = load_tokenizer(str(path))
        assert (again.pad_id, again.eos_id, again.bos_id, again.vocab_size) == \
            (tok.pad_id, tok.eos_id, tok.bos_id, tok.vocab_size)
        text = render.render_query(acre_generate.generate_problems("IID", "val", 1, seed=0)[0], 0, "text").prompt
        assert again.encode(text) == tok.encode(text)


def test_load_plain_hf_tokenizer_json(tmp_path):
    vocab = {"<pad>": 0, "hello": 1, "</s>": 2, "<unk>": 3, "<s>": 4}
    tk = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tk.save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(str(tmp_path))                       # guessed: EOS "</s>", pad 0, no BOS
    assert (tok.pad_id, tok.eos_id, tok.bos_id) == (0, 2, None)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": {"content": "<unk>"}, "bos_token": "<s>", "add_bos_token": True, "pad_token": "hello"}))
    tok = load_tokenizer(str(tmp_path))
    assert (tok.pad_id, tok.eos_id, tok.bos_id) == (1, 3, 4)
    assert tok.encode("hello hello") == [1, 1]


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        load_tokenizer(str(tmp_path))
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a valid"):
        load_tokenizer(str(tmp_path))


def test_acre_word_tokenizer_covers_every_split():
    tok = acre_word_tokenizer()
    assert tok.tk.get_vocab() == acre_word_tokenizer().tk.get_vocab()
    unk = tok.token_to_id("<unk>")
    seen = set()
    for i, split in enumerate(SPLITS):
        for part in ("train", "val", "test"):
            for problem in acre_generate.generate_problems(split, part, 30, seed=i):
                for style in render.DOMAINS:
                    for form in render.FORMS:
                        for ex in render.render_problem(problem, style, packed=False, form=form):
                            ids = tok.encode(ex.prompt) + tok.encode(ex.answer)
                            assert unk not in ids, (split, part, style, form, ex.prompt)
                            seen.update(ids)
    every_object = [{"light_state": "on", "objects": list(range(48))}] * 6 + \
        [{"light_state": "no", "objects": list(range(48)), "label": lab, "type": "direct"}
         for lab in (0, 1, 2, 2)]
    for style in render.DOMAINS:
        for form in render.FORMS:
            for ex in render.render_problem(every_object, style, packed=False, form=form):
                ids = tok.encode(ex.prompt) + tok.encode(ex.answer)
                assert unk not in ids
                seen.update(ids)
    assert seen == set(range(4, tok.vocab_size))        # and no word in the vocabulary is unused


# ------------------------------------------------------------------------------------------------- SmolLM2

STRINGS = [
    "Hello world", "  leading spaces and   runs\tof whitespace\n\nnew lines ",
    "[47, 39, 22, 28, 38] -> 2\n[38] -> 0", "12345 + 678 = 13023; 3.14159",
    "A green sphere in rubber is visible. The state of the light is on",
    "<|im_start|>user\nHi there<|im_end|>\n<|endoftext|>", "naïve café — 東京 🚀 emoji",
    "don't we'll THEY'RE it's", "x=1;y  =2\r\nz",
]


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    old = os.environ.get("ICLM_JAX_CACHE")
    os.environ["ICLM_JAX_CACHE"] = str(cache)
    try:
        built = smollm2_tokenizer()          # builds and caches
        cached = smollm2_tokenizer()         # loads the cache
    finally:
        if old is None:
            del os.environ["ICLM_JAX_CACHE"]
        else:
            os.environ["ICLM_JAX_CACHE"] = old
    assert any(p.is_dir() for p in (cache / "tokenizers").iterdir())
    return built, cached


@pytest.fixture(scope="module")
def hf_reference():
    from transformers import AutoTokenizer
    path = smollm2_gguf_path()
    return AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))


def _acre_texts():
    problem = acre_generate.generate_problems("IID", "test", 1, seed=5)[0]
    out = []
    for style in render.DOMAINS:
        out += [e.prompt + e.answer for e in render.render_problem(problem, style, packed=False)]
    return out


def test_smollm2_parity_with_transformers(smol, hf_reference):
    built, cached = smol
    assert (built.vocab_size, built.eos_id, built.pad_id, built.bos_id) == (49152, 2, 0, None)
    for text in STRINGS + _acre_texts():
        ref = hf_reference.encode(text, add_special_tokens=False)
        assert built.encode(text) == ref, text
        assert cached.encode(text) == ref, text
        assert built.decode(ref) == hf_reference.decode(ref, skip_special_tokens=True)
    assert built.decode(built.encode(STRINGS[1] + STRINGS[6])) == STRINGS[1] + STRINGS[6]


def test_smollm2_answers_tokenize_alike(smol):
    tok = smol[0]
    problem = acre_generate.generate_problems("IID", "val", 1, seed=1)[0]
    for style in render.DOMAINS:
        packed = render.render_problem(problem, style, packed=True)
        for ex, (query, _) in zip(render.render_problem(problem, style, packed=False), packed.queries):
            joint = tok.encode(ex.prompt + ex.answer)
            assert joint == tok.encode(ex.prompt) + tok.encode(ex.answer)
            assert tok.encode(ex.prompt) == tok.encode(packed.prefix) + tok.encode(query)
        for label in range(3):
            assert len(tok.encode(render.answer_text(label, style))) >= 1

