"""RAVEN problems as text: the two domains of ``render`` (symbolic, text) in two forms (full, compact).

One example per problem; the answer is the target candidate's letter, ``" A"`` .. ``" H"``. For a
center_single problem whose first panel is a large (3) orange (2) circle (4) at 90 degrees (5):

full text::

    <INSTRUCTIONS["text"]>
    Panel 1: a large orange circle rotated at 90 degrees.
    ...                                   (panels 1-8, row by row, then the candidates)
    A: a huge blue circle rotated at -45 degrees.
    ...
    The answer is

full symbolic: the same lines with ``(type, size, color, angle)`` codes, ``(position, type, size,
color, angle)`` in distribute_four; entities of a panel joined by ``", "``; last line ``Answer:``.
In text, distribute_four entities end in their cell ("at top left") and in_center ones start with
their component ("an outer giant red square ..., an inner tiny blue circle ...").

compact (the CPU protocol; no instruction, no filler): each panel is its entities' attribute words
(text: ``large orange circle 90``, cell words first in distribute_four, ``outer``/``inner`` first in
in_center) or code tokens (symbolic: ``t4 s3 c2 a5``, ``p1`` first for a cell), followed by ``" |"``;
a newline ends each row of the grid, then one line of candidates each led by its letter, then
``answer:``::

    large orange circle 90 | large orange circle 45 | large orange circle 0 |
    ...
    A huge blue circle -45 | B ... | ... | H ... |
    answer:

Packed, with attribute queries (``render_packed``; the CPU recipe's training rows): the prompt above
without its last line is a shared prefix, and the row asks ``answer:`` (the letter) and then, with
``extra_queries``, one question per attribute of the missing panel's entity, ``type:`` / ``size:`` /
``color:``, answered in the row's style (`` t4`` or `` circle``). Each query sees the prefix and itself
only (the packed rows' segment mask), so the letter query is exactly the unpacked question; the attribute
queries supervise what the letter depends on, the rule applied to the third row (Angle is noise: not
asked). With the ``candidates`` kind (``data.extra_query_kinds=attributes,candidates``) the row then asks,
per candidate, ``A:`` .. ``H:``, how many of the three attributes it shares with the answer (`` 0`` ..
`` 3``): the comparison the letter needs, one candidate at a time. The ``echo`` kind asks the same
counts after each candidate written out again as the candidate line has it (``C t4 s3 c2 a5 |``). The
``lookup`` kind asks, per candidate, the letter question followed by that candidate's panel as a worked answer
writes it (``answer: t3 s2 c2`` -> `` C``): the lookup a worked answer's letter needs, on all 8 candidates.
Defined for one-entity panels (``center_single``, the training configuration; ``lookup`` for any).

Worked answers (``data.worked_answer``; ``worked_answer_text``): the answer writes the missing panel out
as the prompt writes a candidate, without its angles, before the letter: ``answer:`` -> `` t4 s3 c2 C``
(the same prompt). The letter then needs only a lookup of the written panel among the candidate line's,
and exact match under teacher forcing (how evaluation scores every answer) is greedy decoding's exact
match: the panel and the letter must both be right.

Whitespace rule (as ``render``): a prompt never ends in whitespace and an answer always starts with
one space. ``vocabulary_words`` lists every word any rendering can produce, split like the word-level
tokenizer's pre-tokenizer (whitespace, then each punctuation character on its own).
"""
from __future__ import annotations

import string
import unicodedata

from iclm_jax.data.raven import (
    ANGLES,
    COLORS,
    COMPONENTS,
    CONFIGURATIONS,
    NUM_CANDIDATES,
    POSITIONS,
    SIZES,
    TYPES,
)
from iclm_jax.data.render import DOMAINS, FORMS, Example, PackedExample

LETTERS = "ABCDEFGH"
INSTRUCTIONS = {
    "symbolic": "Each shape is (type, size, color, angle), or (position, type, size, color, angle) "
                "in a 2 by 2 grid. Panels 1 to 8 fill a 3 by 3 grid row by row; "
                "which candidate completes the grid?",
    "text": "Panels 1 to 8 fill a 3 by 3 grid row by row and the ninth panel is missing. "
            "Each row follows rules on the shapes. Which candidate completes the grid?",
}
QUERY = {("symbolic", "full"): "Answer:", ("text", "full"): "The answer is", "compact": "answer:"}
#: The attribute queries of ``render_packed(..., extra_queries=True)``, in order (Angle is noise).
ATTRIBUTES = ("type", "size", "color")
MAX_ATTRIBUTE_QUERIES = len(ATTRIBUTES)
#: The kinds of extra query a packed training row can ask (``data.extra_query_kinds``): ``attributes``
#: (``attribute_queries``, the default), ``candidates`` (``candidate_queries``: by letter), ``echo``
#: (``echo_queries``: each candidate written out again) and ``lookup`` (``lookup_queries``: each candidate's
#: letter given its panel), with the most queries each adds.
QUERY_KINDS = {"attributes": MAX_ATTRIBUTE_QUERIES, "candidates": NUM_CANDIDATES, "echo": NUM_CANDIDATES,
               "lookup": NUM_CANDIDATES}


def _check(style: str, form: str) -> None:
    if style not in DOMAINS:
        raise ValueError(f"unknown rendering style {style!r}; expected one of {DOMAINS}")
    if form not in FORMS:
        raise ValueError(f"unknown rendering form {form!r}; expected one of {FORMS}")


def _question(style: str, form: str) -> str:
    """The letter question, the prompt's last line (``answer:`` in compact form)."""
    return QUERY["compact"] if form == "compact" else QUERY[(style, form)]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _entity(ent: dict, configuration: str, style: str, form: str, angle: bool = True) -> str:
    codes = [ent["type"], ent["size"], ent["color"]] + ([ent["angle"]] if angle else [])
    cell = configuration == "distribute_four"
    if style == "symbolic":
        if form == "compact":
            return " ".join(([f"p{ent['position']}"] if cell else [])
                            + [f"{k}{v}" for k, v in zip("tsca", codes)])
        return "(" + ", ".join(map(str, ([ent["position"]] if cell else []) + codes)) + ")"
    words = [SIZES[ent["size"]], COLORS[ent["color"]], TYPES[ent["type"]]]
    degrees = [str(ANGLES[ent["angle"]])] if angle else []
    comp = [COMPONENTS[ent["component"]]] if configuration == CONFIGURATIONS[2] else []
    if form == "compact":
        return " ".join(([POSITIONS[ent["position"]]] if cell else []) + comp + words + degrees)
    where = f" at {POSITIONS[ent['position']]}" if cell else ""
    desc = comp + words
    rotated = f" rotated at {degrees[0]} degrees" if angle else ""
    return f"{_article(desc[0])} {' '.join(desc)}{rotated}{where}"


def render_panel(panel: dict, configuration: str, style: str, form: str = "full", angle: bool = True) -> str:
    """One panel's entities (no label): ``", "``-joined in full form, space-joined in compact; without
    their angles when ``angle`` is False (the worked answer's panel: angles are noise)."""
    _check(style, form)
    parts = [_entity(e, configuration, style, form, angle) for e in panel["entities"]]
    return (" " if form == "compact" else ", ").join(parts)


def answer_text(target: int) -> str:
    if not 0 <= target < NUM_CANDIDATES:
        raise ValueError(f"target {target!r} outside 0..{NUM_CANDIDATES - 1}")
    return " " + LETTERS[target]


def worked_answer_text(problem: dict, style: str, form: str = "full") -> str:
    """The worked answer (``data.worked_answer``): the missing panel written out as the prompt writes its
    panels, without angles (noise: no rule fixes them), then its letter: `` t4 s3 c2 C`` (compact
    symbolic), `` large orange circle C`` (compact text), `` (4, 3, 2) C`` / `` a large orange circle C``
    (full). Scored by exact match under teacher forcing, which is greedy decoding's exact match: a row
    counts as right only when the panel and the letter both are."""
    _check(style, form)
    panel = render_panel(problem["candidates"][problem["target"]], problem["configuration"], style, form,
                         angle=False)
    return f" {panel}{answer_text(problem['target'])}"


def render_problem(problem: dict, style: str, form: str = "full", worked: bool = False) -> Example:
    """A validated problem as one prompt/answer pair (``label`` = target index, 0..7); ``worked``: the
    answer is ``worked_answer_text`` (the missing panel, then the letter) instead of the letter alone."""
    _check(style, form)
    config = problem["configuration"]
    if config not in CONFIGURATIONS:
        raise ValueError(f"unknown configuration {config!r}")

    def panel(p: dict) -> str:
        return render_panel(p, config, style, form)

    ctx, cands = problem["panels"], problem["candidates"]
    if form == "compact":
        rows = [" ".join(f"{panel(p)} |" for p in ctx[r:r + 3]) for r in (0, 3, 6)]
        cand_line = " ".join(f"{LETTERS[k]} {panel(p)} |" for k, p in enumerate(cands))
        prompt = "\n".join(rows + [cand_line, _question(style, form)])
    else:
        end = "." if style == "text" else ""
        lines = [INSTRUCTIONS[style]]
        lines += [f"Panel {j + 1}: {panel(p)}{end}" for j, p in enumerate(ctx)]
        lines += [f"{LETTERS[k]}: {panel(p)}{end}" for k, p in enumerate(cands)]
        prompt = "\n".join(lines + [_question(style, form)])
    answer = worked_answer_text(problem, style, form) if worked else answer_text(problem["target"])
    return Example(prompt, answer, DOMAINS.index(style), -1, problem["target"])


def attribute_queries(problem: dict, style: str) -> list[tuple[str, str, int]]:
    """(query, answer, code) per ``ATTRIBUTES`` entry of the answer panel's one entity: ``("type:", " t4",
    4)`` in symbolic, ``("type:", " circle", 4)`` in text. A panel of several entities is refused."""
    ent = _answer_entity(problem, "attribute")
    words = {"type": TYPES, "size": SIZES, "color": COLORS}
    out = []
    for attr in ATTRIBUTES:
        code = ent[attr]
        word = f"{attr[0]}{code}" if style == "symbolic" else str(words[attr][code])
        out.append((f"{attr}:", f" {word}", code))
    return out


def _answer_entity(problem: dict, what: str) -> dict:
    ents = problem["candidates"][problem["target"]]["entities"]
    if len(ents) != 1:
        raise ValueError(f"data.extra_queries: a {problem['configuration']} answer panel holds {len(ents)} "
                         f"entities; {what} queries are defined for one-entity panels (center_single)")
    return ents[0]


def candidate_queries(problem: dict) -> list[tuple[str, str, int]]:
    """(query, answer, count) per candidate, in letter order: ``("C:", " 2", 2)`` when candidate C shares 2
    of ``ATTRIBUTES`` with the answer panel's entity (the answer itself: 3). The same words in both styles
    (the letters and digits every rendering holds). They supervise the comparison the letter question
    needs: with I-RAVEN candidates each switched attribute splits the 8 in half, so the counts are one
    3, three 2s, three 1s and one 0 in center_single."""
    answer = _answer_entity(problem, "candidate")
    out = []
    for k, cand in enumerate(problem["candidates"]):
        if len(cand["entities"]) != 1:
            raise ValueError(f"data.extra_queries: candidate {LETTERS[k]} holds {len(cand['entities'])} entities")
        n = sum(cand["entities"][0][a] == answer[a] for a in ATTRIBUTES)
        out.append((f"{LETTERS[k]}:", f" {n}", n))
    return out


def echo_queries(problem: dict, prompt: str, form: str = "full") -> list[tuple[str, str, int]]:
    """``candidate_queries``' counts, each asked after the candidate written out again as the prompt's
    candidate line writes it (compact: ``"C t4 s3 c2 a5 |"``; full: ``"C: (4, 3, 2, 5)"``) instead of by its
    letter alone: no lookup of the candidate by letter is needed, and the tokens are the same as in the
    prompt's candidate line, so whatever the model computes there to answer is computed on the prompt's
    own candidates too, where the letter question can read it. ``prompt``: the problem's
    ``render_problem`` prompt in ``form`` (the candidate line, or lines, come just before its question)."""
    lines = prompt.split("\n")
    if form == "compact":
        parts = [f"{part.strip()} |" for part in lines[-2].split("|")[:NUM_CANDIDATES]]
    else:
        parts = lines[-1 - NUM_CANDIDATES:-1]
    return [(q, a, n) for q, (_, a, n) in zip(parts, candidate_queries(problem))]


def lookup_queries(problem: dict, style: str, form: str = "full") -> list[tuple[str, str, int]]:
    """(query, answer, index) per candidate, in letter order: the letter question followed by the candidate's
    panel written as a worked answer writes it (no angles), answered by that candidate's letter:
    ``("answer: t3 s2 c2", " C", 2)``. The worked answer's last step (``worked_answer_text``: its letter given
    its panel) is one of these eight; the others train the same lookup on every candidate of the row."""
    _check(style, form)
    query = _question(style, form)
    return [(f"{query} {render_panel(cand, problem['configuration'], style, form, angle=False)}",
             answer_text(k), k) for k, cand in enumerate(problem["candidates"])]


def query_kinds(extra_queries) -> tuple[str, ...]:
    """``extra_queries`` as kinds: False/() -> none, True -> ("attributes",), a sequence of kind names ->
    itself (each checked against ``QUERY_KINDS``)."""
    if extra_queries is True:
        return ("attributes",)
    kinds = tuple(extra_queries or ())
    bad = [k for k in kinds if k not in QUERY_KINDS]
    if bad:
        raise ValueError(f"data.extra_query_kinds: {bad[0]!r} is not one of {tuple(QUERY_KINDS)}")
    return kinds


def max_queries(extra_queries) -> int:
    """The most queries a packed row asks: the letter plus each kind's."""
    return 1 + sum(QUERY_KINDS[k] for k in query_kinds(extra_queries))


def render_packed(problem: dict, style: str, form: str = "full", extra_queries=False,
                  worked: bool = False) -> PackedExample:
    """The problem as a packed row: the prompt's lines before the question as the prefix, then the letter
    question (``render_problem``'s, token for token, its answer worked with ``worked``) and the extra
    queries: ``True`` = the attribute queries, or a sequence of ``QUERY_KINDS`` names, asked in that order."""
    kinds = query_kinds(extra_queries)
    ex = render_problem(problem, style, form, worked)
    head, query = ex.prompt.rsplit("\n", 1)
    queries = [(query, ex.answer, ex.label)]
    extra = {"attributes": lambda: attribute_queries(problem, style), "candidates": lambda: candidate_queries(problem),
             "echo": lambda: echo_queries(problem, ex.prompt, form),
             "lookup": lambda: lookup_queries(problem, style, form)}
    for kind in kinds:
        queries += extra[kind]()
    return PackedExample(head + "\n", tuple((q, a) for q, a, _ in queries), ex.domain, (-1,) * len(queries),
                         tuple(code for _, _, code in queries))


def split_words(text: str) -> list[str]:
    """The word tokenizer's pre-tokenization: split on whitespace, then every punctuation character
    (ASCII punctuation or a Unicode P* category) is a word of its own."""
    words = []
    for chunk in text.split():
        word = ""
        for ch in chunk:
            if ch in string.punctuation or unicodedata.category(ch).startswith("P"):
                words += [word, ch] if word else [ch]
                word = ""
            else:
                word += ch
        if word:
            words.append(word)
    return words


def _every_entity(configuration: str) -> list[dict]:
    n = max(len(TYPES), len(SIZES), len(COLORS), len(ANGLES), len(POSITIONS))
    return [{"type": k % len(TYPES), "size": k % len(SIZES), "color": k % len(COLORS),
             "angle": k % len(ANGLES), "position": k % len(POSITIONS) if configuration == "distribute_four"
             else 0, "component": k % 2 if configuration == CONFIGURATIONS[2] else 0} for k in range(n)]


def vocabulary_words() -> list[str]:
    """Sorted: every word (``split_words``) of any rendering, both styles and forms, every configuration."""
    texts = list(INSTRUCTIONS.values()) + list(QUERY.values()) + [answer_text(k) for k in range(8)]
    texts += [f"{attr}:" for attr in ATTRIBUTES]
    texts += [f"Panel {j + 1}: . |" for j in range(8)] + [f"{x}: {x} |" for x in LETTERS]
    for config in CONFIGURATIONS:
        panel = {"entities": _every_entity(config)}
        texts += [render_panel(panel, config, s, f) for s in DOMAINS for f in FORMS]
    return sorted({w for t in texts for w in split_words(t)})
