"""ICLM on ACRE (text + symbolic renderings as the two domains).

    get_config()            # "demo": the tiny from-scratch CPU ICLM (K = 2) the tests build on
    get_config("baseline")  # one LoRA module, no router, no invariant module, no MI (same code, K = 1)
    get_config("iclm")      # the full ICLM (= the default; a name for sweeps and tables)
    get_config("no_mi")     # the ICLM without the MI term (mi.estimator=none)
    get_config("no_invariant")   # K modules + router on the base's states; no invariant module, no MI
    get_config("plugin")    # the paper's plug-in MI estimator instead of MINE
    get_config("oracle")    # perfect router: route by the known rendering domain
    get_config("paper")     # paper-like: gradient VQ, router adapter, MI on all modules, aux heads, official weights
    get_config("k4")        # K = 4 specific modules (k2, k4, k8, ...: any kN)
    get_config("logits")    # the aggregator variants: concat (default) | logits | probs
    get_config("strict_sys")     # protocol strict: train on Sys-train, test on Sys (strict_comp: CompHeldout)
    get_config("cpu")       # the CPU learning recipe: compact rendering, extra queries, streamed data
    get_config("cpu,short") # `make demo`: the ICLM with the cpu recipe's data and loss, cut to ~5 minutes

Variants combine with commas: get_config("baseline,text") trains on the text rendering only, and
get_config("cpu,baseline,symbolic") is the single-module CPU recipe on the symbolic rendering.
Every field is overridable from the command line, e.g. --config.train.steps=20.

get_sweep(arg) is the ablation grid for `python -m iclm_jax.sweep --config=experiments/configs/acre.py:ARG`:
each variant of SWEEP_VARIANTS x seeds 0 and 1, on top of ARG (e.g. "cpu"); with "reproduce" in ARG the
reproduction grid of `make reproduce` (REPRODUCE_VARIANTS under protocol paper, baseline and iclm under
protocol strict, seeds 0 and 1); with "modules" in ARG, K = 2, 4, 8 and the aggregators.
"""
import re

import ml_collections


def get_config(arg: str = "demo") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0

    # Base transformer (from scratch here; the smollm2 config loads a pretrained one).
    c.model = dict(
        vocab_size=0,              # 0 = take it from the tokenizer
        d_model=64, n_layers=4, n_heads=2, n_kv_heads=1, head_dim=32, mlp_dim=192,
        rope_theta=10000.0, norm_eps=1e-5, tie_embeddings=True,
        dtype="float32",           # compute dtype: bfloat16 on accelerators
        remat="none",              # per-block rematerialisation: none | block (keep inputs only) | dots
        scan_layers=False,         # True: the blocks as one lax.scan (compiles one block; same values)
        attention="materialised",  # the kernel: materialised | xla (jax.nn.dot_product_attention: the same values,
        #                            0.84-0.97x the time under load, BENCHMARKS.md) | cudnn (GPU, 16-bit)
        canon=0,                   # K > 0: a width-K canon layer on the embeddings (not in Llama; see cpu)
        init="",                   # pretrained base: "smollm2" | a Hugging Face dir | a .gguf file
        train_base=True,           # False: frozen pretrained base, only adapters/router/aggregator train
        num_modules=2,             # K domain-specific modules
        invariant=True,            # the domain-invariant module
        aggregator="concat",       # concat | logits | probs
        invariant_weight=0.5,      # for logits/probs aggregators (the no_invariant variant drops the module)
    )
    c.lora = dict(rank=8, alpha=16.0, dropout=0.0, targets="q,k,v,o,gate,up,down")

    c.router = dict(
        source="invariant",        # invariant (free, stop-gradient) | base | adapter (paper)
        update="ema",              # ema (VQ-VAE EMA, default) | gradient (codebook + commitment loss, paper)
        mode="hard",               # hard | soft | gumbel | oracle (route by the known domain)
        proj_dim=0,                # 0: codebook in the model width
        center=True,               # subtract a running mean of the pooled states, then
        normalize=True,            # L2-normalise them: robust to a base drifting while it trains
        ema_decay=0.9, commitment=0.25, dead_threshold=0.05, temperature=1.0,
        relocate=True,             # move a code whose removal costs less than splitting another gains (ELBG)
        weight=1.0,                # routing_weight on the VQ loss
    )
    c.mi = dict(
        estimator="mine",          # mine | plugin | none
        weight=0.1,                # λ
        apply_to="routed",         # routed | all (paper: every specific module)
        pool="prompt",             # prompt | answer: the states MI reads, pooled over the prompt or the answer
        reduce="mean",             # mean | sum of the K estimates with apply_to=all (official code: sum)
        reverse=False,             # plugin: the official code's KL direction
        critic_hidden=64, critic_depth=2, critic_lr=1e-3, ema_decay=0.99, clip=20.0,
    )
    c.loss = dict(
        aux_weight=0.0,            # CE of each module's own head (paper: invariant + routed specific)
        context_weight=0.0,        # auxiliary next-token CE on the prompt (contexts, query objects)
        logit_chunk=64,            # positions per LM-head call: logits exist only where a loss reads them
    )

    c.data = dict(
        task="acre",               # the problem generator (sources.GENERATORS): acre
        train_split="IID",         # ACRE split whose train part is generated for training
        styles="symbolic,text",    # renderings = domains (ids 0, 1)
        packed=True,               # one row per problem: 6 contexts shared by its 4 queries
        form="full",               # full: the paper's renderings | compact: no preamble, one line per panel
        extra_queries=False,       # training rows also ask about every context object alone (packed only)
        extra_query_kinds="",      # which extra queries where a task offers several (raven: attributes,candidates,echo)
        worked_answer=False,       # raven: the answer writes the missing panel out, then its letter (exact match)
        val_problems=0,            # generated validation problems (train split, "val" part); 0 = none
        train_problems=6000,       # generated problems per rendering
        stream=False,              # True: endless fresh train problems (train_problems: reference sample)
        eval_splits="IID,Comp,Sys",
        eval_problems=300,         # generated test problems per split and rendering
        train_file="",             # optional ACRE release JSON or evals JSONL instead of generating
        eval_files="",             # optional comma-separated files to evaluate besides generated splits
        tokenizer="acre_word",     # acre_word | smollm2 | a directory holding tokenizer.json
        max_unk=0.05,              # refuse a data file with more <unk> tokens than this fraction
        max_len=0,                 # 0 = longest example rounded up to 32
        length_bucket=0,           # > 0: pad each training and evaluation batch to a multiple of this that holds
        #                            its longest row, not to max_len (fewer positions; one compile per length)
        num_domains=2,
        workers=0,                 # grain worker processes
    )
    c.train = dict(
        steps=250, batch_size=16, lr=2e-3, warmup_steps=25, final_lr_fraction=0.1,
        weight_decay=0.01, grad_clip=1.0, b1=0.9, b2=0.95, grad_accum=1,
        adam_eps=1e-8,             # Adam's eps (model and MINE critic): its update g/(|g|+eps) has slope 1/eps at 0
        log_every=20, time_limit_s=0.0,   # 0 = no limit; else stop training after this many seconds
        nonfinite="stop",          # a NaN/Inf loss term or gradient: stop (naming step and term) | skip
        skip_limit=0.5,            # skip: stop when more than this fraction of the last 20 steps were skipped
    )
    # every=0: evaluate at the end only. Every `every` steps only the sets named in `during` are evaluated
    # ("val" = the generated validation set of data.val_problems; "" or no such set: all of them).
    # at_start: also evaluate those sets before the first step (a pretrained base's zero-shot level).
    c.eval = dict(every=0, batch_size=32, during="val", at_start=False)
    c.checkpoint = dict(
        every=0,                   # save every N steps (0: at the end only); a run always resumes
        keep=3,                    # from the latest finalized checkpoint in its workdir
        best_metric="",            # e.g. "IID/all": also keep the best checkpoints by this eval metric
    )
    c.init_from = ""               # another run's workdir: start from its parameters (not its step)
    # Continual learning of a new domain (README "Continual learning"): start from a trained run's workdir and
    # train on this config's data. grow: one new specific module and router code, the run's modules, codes,
    # aggregator and base frozen (model.num_modules and model.train_base are set from the run) | finetune: the
    # baseline, the run as it is with only its base frozen.
    c.continual = dict(from_run="", mode="grow", train_invariant=False)
    # Device mesh: sizes of the named axes (-1 = the remaining devices). With slices = S > 1 the sizes
    # are one slice's (ICI) and the data axis repeats over the S slices (DCN): TPU multislice, GPU nodes.
    c.mesh = dict(data=-1, fsdp=1, tensor=1, module=1, slices=1)
    # Logical axis -> comma-separated mesh axes ("" = replicated). Model code names only logical axes.
    c.rules = dict(
        batch="data,fsdp", length="",          # activations: rows over data x fsdp, sequence replicated
        vocab="tensor", embed="fsdp", act_embed="", mlp="tensor", heads="tensor", kv="tensor",
        layers="", module="module",            # module: stacked adapters, expert-parallel over "module"
        codes="", lora="", mi_in="", mi_hidden="",
    )

    for v in filter(None, (s.strip() for s in arg.split(","))):
        k = re.fullmatch(r"k(\d+)", v)
        if k:
            c.model.num_modules = int(k.group(1))
            continue
        if v not in _VARIANTS:
            raise ValueError(f"unknown config variant {v!r}; known: {', '.join(_VARIANTS)}, kN (N modules)")
        _VARIANTS[v](c)
    return c


SWEEP_VARIANTS = ("iclm", "baseline", "no_mi", "no_invariant", "oracle", "plugin")
REPRODUCE_VARIANTS = ("baseline", "iclm", "no_mi", "no_invariant", "oracle")   # issue `experiments`
STRICT_VARIANTS = ("baseline", "iclm")
SEEDS = (0, 1)


def get_sweep(arg: str = "") -> list[dict]:
    variants = set(filter(None, (s.strip() for s in arg.split(","))))
    if "reproduce" in variants:
        return ([{"variant": v, "seed": s} for v in REPRODUCE_VARIANTS for s in SEEDS]
                + [{"variant": f"{v},{p}", "seed": s} for p in ("strict_sys", "strict_comp")
                   for v in STRICT_VARIANTS for s in SEEDS])
    if "modules" in variants:
        return ([{"variant": f"k{k}", "seed": s} for k in (2, 4, 8) for s in SEEDS]
                + [{"variant": a, "seed": s} for a in ("logits", "probs") for s in SEEDS])
    return [{"variant": v, "seed": s} for v in SWEEP_VARIANTS for s in SEEDS]


def _baseline(c):
    c.model.num_modules = 1
    c.model.invariant = False
    c.mi.estimator = "none"


def _no_mi(c):
    c.mi.estimator = "none"


def _no_invariant(c):
    # As the official code ablates it: the invariant module is not run at all (no adapter, no aggregator:
    # the routed module's own head gives the logits), so there is no MI term, and the router reads the
    # base's own states (it cannot read the invariant's).
    c.model.invariant = False
    c.router.source = "base"
    c.mi.estimator = "none"


def _plugin(c):
    c.mi.estimator = "plugin"


def _oracle(c):
    c.router.mode = "oracle"


def _paper(c):
    c.router.source = "adapter"
    c.router.update = "gradient"
    c.mi.apply_to, c.mi.pool, c.mi.reduce = "all", "answer", "sum"   # the official code: answer-token
    #                                          states of every module, their MI terms summed
    c.loss.aux_weight = 1.0
    # The official code's weights (routing 0.1, MI 0.01) and LoRA targets (attention projections only).
    c.router.weight, c.mi.weight = 0.1, 0.01
    c.lora.targets = "q,k,v,o"


def _reproduce(c):
    """`make reproduce` (with "cpu"): the budget of every point of the reproduction grid, in steps (so
    that a loaded machine changes the hours, not the result). The `cpu` ICLM passed 70% on validation at
    step 1,500 and 90% at ~4,000; the single-module baseline on both renderings was still at the plateau
    at step 3,000 (learnability.md, "The reproduction budget"). 4,000 steps: ~22 min per ICLM point,
    ~13 per baseline point on a loaded machine (~5.5 h for the grid's 18 points; ~4 h on 2 idle cores)."""
    c.train.steps, c.train.time_limit_s = 4000, 0.0
    c.eval.every, c.checkpoint.every = 500, 1000
    c.data.val_problems, c.data.eval_problems = 300, 300


def _strict_sys(c):
    # Protocol strict: no test distribution in training. Train on Sys-train (and select on its val part),
    # test on Sys (the paper's protocol trains on IID and tests everything).
    c.data.train_split, c.data.eval_splits = "Sys", "Sys"


def _strict_comp(c):
    c.data.train_split, c.data.eval_splits = "CompHeldout", "CompHeldout"


def _aggregator(name):
    def set_(c):
        c.model.aggregator = name
    return set_


def _text(c):
    c.data.styles = "text"


def _symbolic(c):
    c.data.styles = "symbolic"


def _cpu(c):
    """The CPU learning recipe (issue `learn`): what makes a from-scratch model learn the blicket rule
    on 2 cores within the hour. Measured alternatives are in experiments/results/learnability.md."""
    d = c.data
    d.form = "compact"        # no preamble; a light word before every object (a previous-token
    #                           pattern tells an object its panel's light); ~3x fewer tokens
    d.extra_queries = True    # every context object asked alone too: ~3x the answers per row
    d.stream = True           # fresh problems every step, never a repeat (index-seeded, resumable)
    d.length_bucket = 16      # rows are ~half of max_len on average: pad each batch to its own length
    #                           (the same losses on ~1.4x fewer positions; benchmarks/padding.py)
    d.val_problems = 500      # generated IID *validation* problems: select recipes on these only
    d.eval_problems = 500
    c.loss.context_weight = 0.5   # next-token CE on the contexts trains that light-reading pattern
    # LoRA scale alpha/rank = 1/8 instead of 2: on a base trained from scratch, Adam moves every LoRA B
    # entry by ~lr per step whatever its gradient, and at scale 2 that random walk perturbs all seven
    # projections of every block by more than their init (std 0.02) within ~1,000 steps. At scale 2
    # the baseline stayed the majority-level predictor for 4,000 steps (learnability.md).
    c.lora.alpha = 1.0
    m = c.model
    m.d_model, m.n_layers, m.n_heads, m.n_kv_heads, m.head_dim, m.mlp_dim = 64, 4, 2, 2, 32, 192
    # A width-4 canon layer on the embeddings (model/canon.py: canon_mix): an object's last token then holds
    # its light word and its whole name (text: 3 attribute words), so a query matches its earlier
    # occurrences in one attention step. Without it every model sat on a plateau at the object-count
    # level for ~5,000 steps before finding the two-layer induction circuit; with it the prototype left
    # it after ~750-1,000 steps at batch 8 (learnability.md, "The plateau, removed").
    m.canon = 4
    t = c.train
    # Batch 8: a small batch left the plateau after the fewest problems (without the canon layer: batch 8
    # after ~40k, batch 32 after ~160k), and a batch-8 ICLM step costs ~0.3 s here.
    t.batch_size, t.lr, t.warmup_steps, t.final_lr_fraction, t.b2 = 8, 3e-3, 200, 0.1, 0.98
    t.steps, t.time_limit_s = 30000, 3600.0   # whichever comes first; time excludes periodic eval
    t.log_every = 50
    c.eval.every = 500
    c.checkpoint.every = 2000


def _short(c):
    """`make demo` (with "cpu,baseline,symbolic"): the cpu recipe cut to 1,600 steps, ~3 minutes of
    single-module steps on 2 cores. It leaves the plateau after ~1,000-1,300 steps (learnability.md,
    "The demo"); the ICLM on both renderings needs ~1,500 steps at 3x the cost per step, too long for
    5 minutes (`make demo-iclm` runs it for 12)."""
    c.train.steps, c.train.warmup_steps, c.train.time_limit_s = 1600, 200, 0.0
    c.train.log_every = 50
    c.eval.every, c.checkpoint.every = 400, 0
    c.data.val_problems, c.data.eval_problems = 100, 300


_VARIANTS = {"demo": lambda c: None, "iclm": lambda c: None, "no_mi": _no_mi, "cpu": _cpu, "short": _short,
             "baseline": _baseline, "no_invariant": _no_invariant,
             "plugin": _plugin, "oracle": _oracle, "paper": _paper, "text": _text,
             "symbolic": _symbolic, "strict_sys": _strict_sys, "strict_comp": _strict_comp,
             "concat": _aggregator("concat"), "logits": _aggregator("logits"), "probs": _aggregator("probs"),
             "reproduce": _reproduce, "modules": lambda c: None}
