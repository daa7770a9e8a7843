"""Why does a trained ICLM route an eval set the way it does? (experiments/results/acre_cpu.md, router NMI)

Not part of the package. For a finished run whose router reads a pooled state (``router.source``), on one of
its eval sets (default ``val``):

  1. routes the rows again in NumPy from the pooled invariant states the eval step returns, the router's stored
     running mean and its codebook (its ``center`` / ``normalize`` / projection settings), and checks that
     this agrees with the model's own choice on every row;
  2. routes them with the set's own mean in place of the running one (is the running mean's noise the cause?);
  3. prints the distance between the two renderings' mean states next to the spread within a rendering;
  4. where the training rows ask extra queries (``data.extra_queries``), renders the set's problems with them
     and routes those through the model (does the difference between training and evaluation rows matter?).

Each line gives the normalised mutual information of the routes with the rendering and the rows per module::

    python experiments/prototypes/router_diagnosis.py runs/reproduce/variant=iclm,seed=0
"""
import argparse

import numpy as np
from flax import nnx

from iclm_jax.data import tasks
from iclm_jax.fields import csv
from iclm_jax.independence import nmi
from iclm_jax.train.run import load_run


def _routes(run, examples):
    res = run.run_set(run.eval_step, examples)
    real = res["present"].any(1)
    return res, real


def diagnose(workdir: str, set_name: str = "val") -> dict:
    run = load_run(workdir)
    if run.model_cfg.router_source != "invariant" or run.num_modules < 2:
        raise SystemExit(f"{workdir}: this diagnosis is for a router reading the invariant state (K >= 2)")
    es = run.eval_sets([set_name])
    if not es:
        raise SystemExit(f"{workdir}: no eval set {set_name!r}")
    es = es[0]
    res, real = _routes(run, es.examples)
    e = np.asarray(res["pooled_inv"][real], np.float64)
    dom, mod = res["domain"][real], res["module"][real]
    router = nnx.merge(run.graphdef, run.state).model.router
    cb = np.asarray(router.codebook[...], np.float64)
    proj = None if router.proj is None else np.asarray(router.proj[...], np.float64)

    def route(mean):
        z = e - mean if router.center else e
        if router.normalize:
            z = z / np.sqrt((z * z).sum(1, keepdims=True) + 1e-12)
        if proj is not None:
            z = z @ proj
        return ((z[:, None] - cb[None]) ** 2).sum(-1).argmin(1)

    stored = np.asarray(router.mean[...], np.float64) if router.center else np.zeros(e.shape[1])
    k = run.num_modules
    out = {"model": (nmi(dom, mod), np.bincount(mod, minlength=k))}
    again = route(stored)
    out["agree"] = float(np.mean(again == mod))
    own = route(e.mean(0))
    out["own mean"] = (nmi(dom, own), np.bincount(own, minlength=k))
    mus = [e[dom == d].mean(0) for d in np.unique(dom)]
    out["domain mean distance"] = float(np.linalg.norm(mus[0] - mus[-1]))
    out["within rms"] = float(np.sqrt(np.mean([((e[dom == d] - mu) ** 2).sum(1).mean()
                                               for d, mu in zip(np.unique(dom), mus)])))
    out["running mean offset"] = float(np.linalg.norm(stored - e.mean(0)))
    d = run.config.data
    out["extra queries"] = None
    if not d.get("extra_queries"):
        return out
    extra = tasks.get(d.task).render(es.problems, tuple(csv(d.styles)), d.packed, d.form, True)
    run._fit("extra queries", extra, 1.0)
    res_x, real_x = _routes(run, extra)
    dx, mx = res_x["domain"][real_x], res_x["module"][real_x]
    out["extra queries"] = (nmi(dx, mx), np.bincount(mx, minlength=k))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("workdir")
    p.add_argument("--set", default="val", help="the run's eval set (default: val)")
    a = p.parse_args(argv)
    o = diagnose(a.workdir, a.set)
    fmt = lambda x: f"NMI {x[0]:.3f}, rows per module {x[1].tolist()}"    # noqa: E731
    print(f"model's routes:                       {fmt(o['model'])}")
    print(f"routed again in NumPy (stored mean):  agrees with the model on {100 * o['agree']:.1f}% of the rows")
    print(f"centred on the set's own mean:        {fmt(o['own mean'])}")
    if o["extra queries"] is not None:
        print(f"rendered with the extra queries:      {fmt(o['extra queries'])}")
    print(f"renderings' mean states {o['domain mean distance']:.3f} apart; spread within one {o['within rms']:.3f} "
          f"(rms); running mean {o['running mean offset']:.3f} from the set's")


if __name__ == "__main__":
    main()
