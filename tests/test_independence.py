"""The independence analysis against independent formulations: NMI from scipy's entropies, CKA from Gram
matrices (HSIC), correlation and CKA invariances, and codebook use by hand."""
import numpy as np
import pytest
from scipy.stats import entropy

from iclm_jax.independence import analyse, codebook_usage, linear_cka, mean_abs_correlation, nmi


def test_nmi_against_scipy_entropies_and_its_limits():
    a = np.array([0, 0, 1, 1, 1, 2, 2, 0, 1, 2])
    b = np.array([1, 1, 0, 0, 1, 1, 0, 1, 0, 0])
    joint = np.zeros((3, 2))
    np.add.at(joint, (a, b), 1)
    ha, hb, hab = entropy(joint.sum(1)), entropy(joint.sum(0)), entropy(joint.ravel())
    assert nmi(a, b) == pytest.approx(2 * (ha + hb - hab) / (ha + hb))
    assert nmi(a, 5 - a) == pytest.approx(1.0)                          # a relabelling is the same partition
    assert nmi([0, 0, 1, 1], [0, 1, 0, 1]) == pytest.approx(0.0)        # independent
    assert np.isnan(nmi([3, 3], [1, 1]))


def test_codebook_usage_by_hand():
    u = codebook_usage([0, 0, 1, 1], 4)
    assert u == {"codes_used": 0.5, "perplexity": pytest.approx(2.0)}


def _hsic_cka(x, y):
    """CKA from centred Gram matrices: HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))."""
    n = len(x)
    h = np.eye(n) - 1.0 / n
    k, l_ = h @ (x @ x.T) @ h, h @ (y @ y.T) @ h
    return np.sum(k * l_) / np.sqrt(np.sum(k * k) * np.sum(l_ * l_))


def test_cka_and_correlation_against_gram_matrices_and_their_invariances():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(60, 5)), rng.normal(size=(60, 7))
    assert linear_cka(x, y) == pytest.approx(_hsic_cka(x, y))
    q, _ = np.linalg.qr(rng.normal(size=(5, 5)))
    assert linear_cka(x, 3 * x @ q + 1) == pytest.approx(1.0)           # rotation, scale, shift
    assert mean_abs_correlation(x, -2 * x + 4) == pytest.approx(1.0)
    big_x, big_y = rng.normal(size=(20000, 4)), rng.normal(size=(20000, 4))
    assert mean_abs_correlation(big_x, big_y) < 0.02 and linear_cka(big_x, big_y) < 0.01
    corr = np.corrcoef(x[:, 0], y[:, 0])[0, 1]
    assert mean_abs_correlation(x[:, :1], y[:, :1]) == pytest.approx(abs(corr))


def test_analyse_reports_what_each_set_supports():
    rng = np.random.default_rng(1)
    inv, spec = rng.normal(size=(8, 3)), rng.normal(size=(8, 3))
    out = analyse([0, 1, 0, 1, 0, 1, 0, 1], [0, 1, 0, 1, 0, 1, 0, 1], 2, inv, spec, {0: inv, 1: spec})
    assert out["router_nmi"] == pytest.approx(1.0) and out["router_codes_used"] == 1.0
    assert {"corr_inv_spec", "cka_inv_spec", "corr_spec0_spec1", "cka_spec0_spec1"} <= set(out)
    one_domain = analyse([0, 1, 0, 1], [1, 1, 1, -1], 2, None, spec[:4], {})
    assert "router_nmi" not in one_domain and "cka_inv_spec" not in one_domain
