"""Throwaway prototype used to choose the CPU recipe's encoding (experiments/results/learnability.md).

Not part of the package: a bare Llama-style ``Transformer`` from ``iclm_jax.model`` (no LoRA, router or
ICLM) trained on freshly generated IID problems in a background thread, with its own row encoding:

  light_first     per panel: light, objects, "|"          (query: objects "?")
  light_last_sep  per panel: objects, "=", light, "|"
  fused           per panel: one token per (object, light) pair, "|"
  lpo             per panel: light before every object, "|"   (what became render's compact form)

--noq 1 drops the "?" after a query (the answer follows its last object); --extra 1 also asks about
every context object alone; --ctx W adds W x next-token CE on the contexts. Validation: 600 generated
IID *val* problems, 4 queries each, accuracy per query type. Example (the recipe that was ported)::

    python experiments/prototypes/acre_proto.py --enc lpo --noq 1 --d 64 --heads 2 --batch 32 \
        --lr 3e-3 --extra 1 --ctx 0.5 --max_len 80 --minutes 15 --eval_every 500 --tag big
"""

import argparse
import json
import queue
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from iclm_jax.data import acre
from iclm_jax.data import acre_generate as gen
from iclm_jax.model.transformer import Transformer, TransformerConfig

p = argparse.ArgumentParser()
p.add_argument("--enc", default="light_first")  # light_first | light_last | both
p.add_argument("--d", type=int, default=128)
p.add_argument("--layers", type=int, default=4)
p.add_argument("--heads", type=int, default=4)
p.add_argument("--batch", type=int, default=64)
p.add_argument("--lr", type=float, default=1e-3)
p.add_argument("--wd", type=float, default=0.01)
p.add_argument("--minutes", type=float, default=10)
p.add_argument("--eval_every", type=int, default=500)
p.add_argument("--warmup", type=int, default=200)
p.add_argument("--steps", type=int, default=100000)
p.add_argument("--max_len", type=int, default=80)
p.add_argument("--tag", default="x")
p.add_argument("--extra", type=int, default=0)
p.add_argument("--noq", type=int, default=0)
p.add_argument("--ctx", type=float, default=0.0)  # must stay < 1 (answers are the weight-1 targets)
p.add_argument("--kv", type=int, default=0)
p.add_argument("--val_n", type=int, default=600)
p.add_argument("--kmin", type=int, default=6)  # training problems keep k ~ U{kmin..6} of their 6 panels
p.add_argument("--seed", type=int, default=0)
p.add_argument("--canon", type=int, default=0)  # K > 0: causal depthwise conv of width K on the embeddings
p.add_argument("--init", default="0.02")  # base kernels' init std: a number, or "lecun" (1/sqrt(fan_in))
a = p.parse_args()

# vocab
SPEC = ["<pad>", "<eos>", "<unk>", "<bos>", "on", "off", "|", "?", "undetermined", "=", ";"]
V = {t: i for i, t in enumerate(SPEC)}
OBJ0 = len(SPEC)
VOCAB = OBJ0 + 48 * 3  # plain objects, then objects in "on" panels, then in "off" panels
ANS = {0: V["off"], 1: V["undetermined"], 2: V["on"]}


def encode(problem, extra_ok=False):
    """-> inputs, targets, positions, segments, mask, qtypes, labels"""
    toks = [V["<bos>"]]
    nc = _nctx(problem)
    for pnl in problem[:nc]:
        lt = V[pnl["light_state"]]
        objs = [OBJ0 + o for o in pnl["objects"]]
        if a.enc == "light_first":
            toks += [lt] + objs + [V["|"]]
        elif a.enc == "light_last":
            toks += objs + [lt]
        elif a.enc == "lpo":
            for o in pnl["objects"]:
                toks += [lt, OBJ0 + o]
            toks += [V["|"]]
        elif a.enc == "fused":
            off = 48 if pnl["light_state"] == "on" else 96
            toks += [OBJ0 + off + o for o in pnl["objects"]] + [V["|"]]
        elif a.enc == "light_last_sep":
            toks += objs + [V["="], lt, V["|"]]
    L = a.max_len
    inp = np.zeros(L, np.int32)
    tgt = np.zeros(L, np.int32)
    pos = np.zeros(L, np.int32)
    seg = np.zeros(L, np.int32)
    msk = np.zeros(L, np.float32)
    n = len(toks)
    inp[:n] = toks
    pos[:n] = np.arange(n)
    seg[:n] = 1
    tgt[: n - 1] = toks[1:]
    cmsk = np.zeros(L, np.float32)
    cmsk[: n - 1] = 1.0
    at = n
    qt, lab = [], []
    queries = list(problem[nc:])
    if extra_ok:
        seen = []
        for c in problem[:nc]:
            for o in c["objects"]:
                if o not in seen:
                    seen.append(o)
        for o in seen:
            queries.append({"objects": [o], "label": acre.derive_label(problem[:nc], [o]), "type": "direct"})
    for j, q in enumerate(queries):
        qtok = [OBJ0 + o for o in q["objects"]] + ([] if a.noq else [V["?"]])
        m = len(qtok)
        inp[at : at + m] = qtok
        pos[at : at + m] = np.arange(n, n + m)
        seg[at : at + m] = 2 + j
        tgt[at + m - 1] = ANS[q["label"]]
        msk[at + m - 1] = 1
        at += m
        if j < 4:
            qt.append(acre.QUERY_TYPES.index(q["type"]))
            lab.append(q["label"])
    assert at <= L, at
    return inp, tgt, pos, seg, msk + a.ctx * cmsk, np.array(qt), np.array(lab)


def truncate(problem, rng):
    """Keep k ~ U{kmin..6} of the 6 context panels (in order) and relabel the queries by the rule."""
    k = int(rng.integers(a.kmin, 7))
    if k == 6:
        return problem
    keep = sorted(rng.choice(6, size=k, replace=False))
    ctx = [problem[i] for i in keep]
    qs = [dict(q, label=acre.derive_label(ctx, q["objects"])) for q in problem[6:]]
    return ctx + qs


def _nctx(problem):
    return sum("label" not in p for p in problem)


def batchify(problems, extra_ok=False):
    cols = list(zip(*[encode(pr, extra_ok) for pr in problems]))
    return [np.stack(c) for c in cols]


cfg = TransformerConfig(
    vocab_size=VOCAB,
    d_model=a.d,
    n_layers=a.layers,
    n_heads=a.heads,
    n_kv_heads=a.kv or a.heads,
    head_dim=a.d // a.heads,
    mlp_dim=a.d * 3,
    tie_embeddings=True,
)
model = Transformer(cfg, None, rngs=nnx.Rngs(a.seed))
if a.init != "0.02":  # rescale the 0.02-std kernels (2-D, or stacked per layer) to the asked std
    st = nnx.state(model, nnx.Param)

    def _rescale(path, x):
        if x.ndim != 2 or "embedding" in str(path):
            return x
        std = 1 / np.sqrt(x.shape[0]) if a.init == "lecun" else float(a.init)
        return x * (std / 0.02)

    st = jax.tree_util.tree_map_with_path(_rescale, st)
    nnx.update(model, st)
nparams = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
sched = optax.warmup_cosine_decay_schedule(0, a.lr, a.warmup, a.steps, a.lr * 0.1)
tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, b1=0.9, b2=0.98, weight_decay=a.wd))
graphdef, params = nnx.split(model, nnx.Param)
if a.canon:  # conv taps [K, d], tap 0 = the token itself; torch Conv1d's default init, U(+-1/sqrt(K))
    params = {
        "model": params,
        "canon": jax.random.uniform(
            jax.random.key(a.seed + 7), (a.canon, a.d), minval=-(a.canon**-0.5), maxval=a.canon**-0.5
        ),
    }
opt_state = tx.init(params)


def canon_mix(x, w, pos, seg):
    """x [B, L, d] + sum_i w[i] * x at the token i positions earlier *in the row this token sees*:
    the same segment, else the prefix (a query's tokens continue the prefix's positions)."""
    L = x.shape[1]
    t = jnp.broadcast_to(jnp.arange(L)[None, :], seg.shape)
    out = x
    for i in range(a.canon):
        same = jnp.take_along_axis(seg, jnp.clip(t - i, 0), 1) == seg
        src = jnp.where(same & (t - i >= 0), t - i, pos - i)
        ok = (pos - i >= 0) & (seg > 0)
        xs = jnp.take_along_axis(x, jnp.clip(src, 0, L - 1)[..., None], 1)
        out = out + w[i] * jnp.where(ok[..., None], xs, 0.0)
    return out


def loss_fn(params, b):
    inp, tgt, pos, seg, msk = b
    if a.canon:
        m = nnx.merge(graphdef, params["model"])
        from iclm_jax.model.transformer import attention_mask

        x = canon_mix(jnp.take(m.embedding[...], inp, axis=0), params["canon"], pos, seg)
        mask = attention_mask(seg)
        for layer in m.layers:
            x = layer(x, pos, mask, None, True)
        h = x
    else:
        m = nnx.merge(graphdef, params)
        h = m(inp, pos, seg)
    logits = m.logits(h)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, tgt)
    ans = msk >= 1.0  # answer targets (weight 1); context targets carry weight ctx < 1
    loss = (ce * msk).sum() / ans.sum()
    acc = ((logits.argmax(-1) == tgt) * ans).sum() / ans.sum()
    return loss, (acc, logits.argmax(-1))


@jax.jit
def train_step(params, opt_state, b):
    (loss, (acc, _)), g = jax.value_and_grad(loss_fn, has_aux=True)(params, b)
    upd, opt_state = tx.update(g, opt_state, params)
    return optax.apply_updates(params, upd), opt_state, loss, acc


@jax.jit
def eval_step(params, b):
    loss, (acc, pred) = loss_fn(params, b)
    return pred


# data: background thread
q = queue.Queue(maxsize=8)


def producer():
    s = 0
    rng = np.random.default_rng(a.seed)
    while True:
        probs = [truncate(pr, rng) for pr in gen.generate_problems("IID", "train", a.batch, 10_000 + s)]
        q.put(batchify(probs, bool(a.extra)))
        s += 1


threading.Thread(target=producer, daemon=True).start()

val = batchify(gen.generate_problems("IID", "val", a.val_n, 1))


def evaluate():
    inp, tgt, pos, seg, msk, qt, lab = val
    preds = []
    for i in range(0, len(inp), 200):
        preds.append(
            np.asarray(eval_step(params, tuple(jnp.asarray(x[i : i + 200]) for x in (inp, tgt, pos, seg, msk))))
        )
    pred = np.concatenate(preds)
    # per query: pred at masked positions, in order
    got = pred[msk >= 1].reshape(-1, 4)
    want = tgt[msk >= 1].reshape(-1, 4)
    ok = got == want
    res = {"all": ok.mean()}
    for t, name in enumerate(acre.QUERY_TYPES):
        res[name] = ok[qt == t].mean()
    return res


print(f"params {nparams}", a, flush=True)
t0 = time.time()
step = 0
lsum = asum = 0
ntok = 0
while time.time() - t0 < a.minutes * 60 and step < a.steps:
    inp, tgt, pos, seg, msk, qt, lab = q.get()
    ntok += (seg > 0).sum()
    params, opt_state, loss, acc = train_step(params, opt_state, (inp, tgt, pos, seg, msk))
    step += 1
    lsum += float(loss)
    asum += float(acc)
    if step % a.eval_every == 0:
        r = evaluate()
        el = time.time() - t0
        print(
            json.dumps(
                {
                    "tag": a.tag,
                    "step": step,
                    "min": round(el / 60, 2),
                    "loss": round(lsum / a.eval_every, 4),
                    "tacc": round(asum / a.eval_every, 3),
                    "tok_s": int(ntok / el),
                    **{k: round(float(v), 3) for k, v in r.items()},
                }
            ),
            flush=True,
        )
        lsum = asum = 0
r = evaluate()
print("FINAL", a.tag, step, json.dumps({k: round(float(v), 3) for k, v in r.items()}), flush=True)
