"""Did the modules become independent? Numbers computed at inference on an eval set's real rows.

* ``router_nmi`` — normalised mutual information between the routed module and the true rendering domain
  (arithmetic normalisation: 2 I / (H(module) + H(domain)); 1 = the routing is the domain, 0 = unrelated).
* ``codebook_usage`` — the fraction of the K codes that receive any row, and the perplexity of the
  assignment (in [1, K]).
* ``corr`` / ``cka`` — between two pooled representations of the same rows: the mean absolute Pearson
  correlation of matching dimensions, and linear CKA (Kornblith et al., 2019; invariant to rotations and
  scale: 1 = the same representation up to those, near 0 = unrelated). Between the invariant and the
  routed specific representation, and between every pair of specific modules.
* ``mi_mine`` / ``mi_plugin`` — the two MI estimators on the whole held-out set side by side: the trained
  MINE critic's Donsker–Varadhan bound (marginal pairs from a fixed random derangement of the rows, not
  their order, which keeps renderings of one problem together) and the paper's plug-in estimate.

* ``*_delta`` — the same CKA on the adapters' contributions (a module's pooled state minus the base's
  without any adapter): every module shares the frozen or slowly trained base, whose part dominates the
  pooled states (their CKA is near 1 whatever the adapters learn); the contributions are what can differ.

``matrices`` keeps what the run report draws (``run_report.py``): the routing confusion counts (domain ×
module) and the CKA / |Pearson| matrices between every pooled representation.
"""
from __future__ import annotations

import itertools

import numpy as np

from iclm_jax.data.render import DOMAINS
from iclm_jax.model import mi as mi_lib


def _entropy(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def nmi(a, b) -> float:
    """Normalised mutual information of two labelings (NaN when both are constant)."""
    a, b = np.asarray(a), np.asarray(b)
    _, ai = np.unique(a, return_inverse=True)
    _, bi = np.unique(b, return_inverse=True)
    joint = np.zeros((ai.max(initial=-1) + 1, bi.max(initial=-1) + 1))
    np.add.at(joint, (ai, bi), 1)
    ha, hb = _entropy(joint.sum(1)), _entropy(joint.sum(0))
    if ha + hb == 0:
        return float("nan")
    mi = ha + hb - _entropy(joint.ravel())
    return float(2 * mi / (ha + hb))


def codebook_usage(index, num_codes: int) -> dict[str, float]:
    counts = np.bincount(np.asarray(index), minlength=num_codes).astype(np.float64)
    return {"codes_used": float((counts > 0).mean()), "perplexity": float(np.exp(_entropy(counts)))}


def mean_abs_correlation(x, y) -> float:
    """Mean over dimensions i of |Pearson(x[:, i], y[:, i])| (constant dimensions are left out)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    x, y = x - x.mean(0), y - y.mean(0)
    sx, sy = np.sqrt((x * x).sum(0)), np.sqrt((y * y).sum(0))
    ok = (sx > 0) & (sy > 0)
    if not ok.any():
        return float("nan")
    return float(np.mean(np.abs((x * y).sum(0)[ok] / (sx[ok] * sy[ok]))))


def linear_cka(x, y) -> float:
    """Linear CKA of two representations [n, d1], [n, d2] of the same n rows."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    x, y = x - x.mean(0), y - y.mean(0)
    xy = np.linalg.norm(y.T @ x) ** 2
    xx, yy = np.linalg.norm(x.T @ x), np.linalg.norm(y.T @ y)
    return float(xy / (xx * yy)) if xx > 0 and yy > 0 else float("nan")


def analyse(module, domain, num_modules: int, pooled_inv=None, pooled_spec=None,
            pooled_alone: dict[int, np.ndarray] | None = None) -> dict[str, float]:
    """The numbers above for one eval set (rows already restricted to real ones)."""
    module, domain = np.asarray(module), np.asarray(domain)
    out: dict[str, float] = {}
    labelled = domain >= 0
    if num_modules > 1 and len(set(domain[labelled].tolist())) >= 2:
        out["router_nmi"] = nmi(module[labelled], domain[labelled])
    if num_modules > 1:
        out.update({f"router_{k}": v for k, v in codebook_usage(module, num_modules).items()})
    if pooled_inv is not None and pooled_spec is not None:
        out["corr_inv_spec"] = mean_abs_correlation(pooled_inv, pooled_spec)
        out["cka_inv_spec"] = linear_cka(pooled_inv, pooled_spec)
    for a, b in itertools.combinations(sorted(pooled_alone or {}), 2):
        out[f"corr_spec{a}_spec{b}"] = mean_abs_correlation(pooled_alone[a], pooled_alone[b])
        out[f"cka_spec{a}_spec{b}"] = linear_cka(pooled_alone[a], pooled_alone[b])
    return out


def held_out_mi(pooled_inv, pooled_spec, critic=None, seed: int = 0) -> dict[str, float]:
    """Plug-in MI and (with a trained ``critic``) MINE's DV bound over all rows at once."""
    x, z = np.asarray(pooled_inv, np.float32), np.asarray(pooled_spec, np.float32)
    out = {"mi_plugin": float(mi_lib.plugin_mi(x, z))}
    if critic is not None and len(x) >= 2:
        perm = np.random.default_rng(seed).permutation(len(x))   # roll after a shuffle: a derangement
        out["mi_mine"] = float(mi_lib.mine_estimate(critic, x[perm], z[perm]))
    return out


def routing_counts(module, domain, num_modules: int) -> dict:
    """Rows per (domain, module): ``{"domains": names, "counts": [[...K] per domain]}``; unlabelled rows
    (domain -1) form a last row when present."""
    module, domain = np.asarray(module), np.asarray(domain)
    ids = sorted(set(domain.tolist()), key=lambda d: (d < 0, d))
    names = [DOMAINS[d] if 0 <= d < len(DOMAINS) else "unlabelled" if d < 0 else f"domain {d}" for d in ids]
    counts = [np.bincount(module[domain == d], minlength=num_modules).tolist() for d in ids]
    return {"domains": names, "counts": counts}


def similarity(reps: dict[str, np.ndarray]) -> dict:
    """Linear CKA and mean |Pearson| between every pair of the named representations (same rows)."""
    names = list(reps)
    cka = [[linear_cka(reps[a], reps[b]) for b in names] for a in names]
    corr = [[mean_abs_correlation(reps[a], reps[b]) for b in names] for a in names]
    return {"names": names, "cka": cka, "corr": corr}


def delta_scalars(sim: dict) -> dict[str, float]:
    """``cka_inv_spec_delta`` and ``cka_spec{a}_spec{b}_delta``, read from ``similarity`` of the adapters'
    contributions (keyed by ``Run._views``' representation names): no CKA is computed twice."""
    at = {name: i for i, name in enumerate(sim["names"])}
    cka = lambda a, b: sim["cka"][at[a]][at[b]]   # noqa: E731
    out = {}
    if "invariant" in at:
        out["cka_inv_spec_delta"] = cka("invariant", "routed specific")
    alone = sorted(int(k.split()[1]) for k in at if k.endswith(" alone"))
    for a, b in itertools.combinations(alone, 2):
        out[f"cka_spec{a}_spec{b}_delta"] = cka(f"specific {a} alone", f"specific {b} alone")
    return out
