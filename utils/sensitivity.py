"""The pre-registered analysis of measured per-expert sensitivities (expert_sensitivity.py;
the rule is written out in results/sensitivity/README.md, before any number was in).

Units are experts; a *group* is one MoE layer of one model (training seed). Every test is
within groups -- experts of different layers or seeds are never ranked against each other --
and pooled as the mean over groups; its p-value comes from permuting one variable within
every group at once (``n_perm`` times), one-sided both ways: ``p_neg`` = P(pooled <= observed)
(the paper predicts a negative sign), ``p_pos`` = P(pooled >= observed).

- T1: Spearman rho(sensitivity, router-norm change) within groups;
- T2: the same, partial: both ranks residualised on rank(routed tokens) (log is monotone, so
  log(routed tokens) ranks the same) before correlating; residuals of the change permuted;
- T3: Spearman rho(damage per routed token, router-norm change) within groups, the rank slope
  of "less frequent but critical", with the fixed-effects OLS slope as the effect size.

Decision (per regime): supported if T1 and T3 are both negative with p_neg < ALPHA; partly
supported if one is; contradicted if T1 is positive with p_pos < ALPHA; else not supported.
"""
from __future__ import annotations

import math

import numpy as np

ALPHA = 0.05
N_PERM = 10_000


def ranks(x) -> np.ndarray:
    """Ranks 0..n-1, ties sharing their mean rank."""
    x = np.asarray(x, dtype=float)
    order = np.argsort(x, kind="stable")
    r = np.empty(len(x))
    r[order] = np.arange(len(x))
    for v in np.unique(x):
        tie = x == v
        if tie.sum() > 1:
            r[tie] = r[tie].mean()
    return r


def _centered(x: np.ndarray) -> np.ndarray:
    return x - x.mean(axis=-1, keepdims=True)


def _corr_rows(x: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Pearson correlation of x (n,) with each row of ys (k, n); nan where one is constant."""
    xc, yc = _centered(x), _centered(ys)
    den = np.sqrt((xc ** 2).sum()) * np.sqrt((yc ** 2).sum(axis=-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (yc @ xc) / den, np.nan)


def residual(y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """y minus its least-squares fit a + b x."""
    X = np.stack([np.ones_like(x), x], axis=1)
    coef, *_ = np.linalg.lstsq(X, y, rcond=None)
    return y - X @ coef


def pooled_test(groups: list[tuple[np.ndarray, np.ndarray]], n_perm: int = N_PERM, seed: int = 0) -> dict:
    """Mean over groups of corr(a, b) for groups of (a, b) (already ranked or residualised), and
    its permutation p-values: b permuted within every group, the pooled mean recomputed."""
    rng = np.random.default_rng(seed)
    observed, null, used = [], np.zeros(n_perm), 0
    for a, b in groups:
        r = _corr_rows(a, b[None])[0]
        if not np.isfinite(r):
            continue   # a constant variable in this group: no rank correlation to speak of
        perms = np.argsort(rng.random((n_perm, len(b))), axis=1)
        null += _corr_rows(a, b[perms])
        observed.append(r)
        used += 1
    if not used:
        return {"stat": float("nan"), "p_neg": float("nan"), "p_pos": float("nan"), "groups": 0}
    stat, null = float(np.mean(observed)), null / used
    eps = 1e-12   # the observed value itself counts among the permutations' ties
    return {"stat": stat, "p_neg": float((1 + (null <= stat + eps).sum()) / (n_perm + 1)),
            "p_pos": float((1 + (null >= stat - eps).sum()) / (n_perm + 1)), "groups": used,
            "per_group": [float(r) for r in observed]}


def spearman_groups(groups: list[tuple], **kw) -> dict:
    """T1 / T3: pooled within-group Spearman rho of (x, y) pairs of arrays."""
    return pooled_test([(ranks(x), ranks(y)) for x, y in groups], **kw)


def partial_groups(groups: list[tuple], **kw) -> dict:
    """T2: pooled within-group partial Spearman of (x, y) given z: ranks of x and y
    residualised on rank(z); the residuals of y are what is permuted."""
    out = []
    for x, y, z in groups:
        rz = ranks(z)
        out.append((residual(ranks(x), rz), residual(ranks(y), rz)))
    return pooled_test(out, **kw)


def fixed_effects_slope(groups: list[tuple], n_perm: int = N_PERM, seed: int = 0) -> dict:
    """OLS slope of y on x with one intercept per group (both centred within groups), and its
    permutation p-values (x permuted within groups). The effect size of T3, in y's units."""
    rng = np.random.default_rng(seed)
    xs = [_centered(np.asarray(x, float)) for x, _ in groups]
    ys = [_centered(np.asarray(y, float)) for _, y in groups]
    sxx = sum((x ** 2).sum() for x in xs)
    if sxx == 0:
        return {"slope": float("nan"), "p_neg": float("nan"), "p_pos": float("nan")}
    slope = sum((x * y).sum() for x, y in zip(xs, ys)) / sxx
    null = sum(x[np.argsort(rng.random((n_perm, len(x))), axis=1)] @ y for x, y in zip(xs, ys)) / sxx
    return {"slope": float(slope), "p_neg": float((1 + (null <= slope).sum()) / (n_perm + 1)),
            "p_pos": float((1 + (null >= slope).sum()) / (n_perm + 1))}


def decide(t1: dict, t3: dict, alpha: float = ALPHA) -> str:
    """The pre-registered rule (module docstring)."""
    neg = lambda t: t["groups"] > 0 and t["stat"] < 0 and t["p_neg"] < alpha
    if neg(t1) and neg(t3):
        return "supported"
    if neg(t1) or neg(t3):
        return "partly supported"
    if t1["groups"] > 0 and t1["stat"] > 0 and t1["p_pos"] < alpha:
        return "contradicted"
    return "not supported"


# ---- from measurement files to the tests -----------------------------------------------

def sensitivity_of(expert: dict, width: int, metric: str) -> float | None:
    """A sensitivity as "larger = more damage": loss-like metrics as they are, accuracy-like
    ones (d_acc, d_exact_match) negated."""
    v = expert["by_width"][str(width)].get(metric)
    if v is None:
        return None
    return -v if metric in ("d_acc", "d_exact_match") else v


def groups_of(files: list[dict]) -> list[list[dict]]:
    """The experts of every (model, layer), each list in expert order."""
    out = []
    for f in files:
        layers = {}
        for x in f["experts"]:
            layers.setdefault(x["layer"], []).append(x)
        out += [sorted(v, key=lambda x: x["expert"]) for v in layers.values()]
    return out


def _pairs(groups, fx, fy, fz=None):
    """Per group the arrays of fx, fy (and fz), experts where any is None left out."""
    out = []
    for g in groups:
        rows = [(fx(x), fy(x)) + ((fz(x),) if fz else ()) for x in g]
        rows = [r for r in rows if all(v is not None and math.isfinite(v) for v in r)]
        if len(rows) >= 3:
            out.append(tuple(np.array(c, dtype=float) for c in zip(*rows)))
    return out


PREDICTORS = {"router_norm_change": "router-norm change", "router_norm": "trained router norm",
              "routed": "routed held-out tokens", "routing_weight": "mean routing weight", "max_var": "MaxVar"}


def analyse(files: list[dict], primary_width: int = 2, n_perm: int = N_PERM) -> dict:
    """Every pre-registered test on the measurement files of one regime."""
    groups = groups_of(files)
    change = lambda x: x.get("router_norm_change")
    sens = lambda x: sensitivity_of(x, primary_width, "d_loss")
    damage = lambda x: sensitivity_of(x, primary_width, "damage_per_routed_token")
    t1 = spearman_groups(_pairs(groups, sens, change), n_perm=n_perm)
    t2 = partial_groups(_pairs(groups, sens, change, lambda x: x["routed"]), n_perm=n_perm)
    t3 = spearman_groups(_pairs(groups, damage, change), n_perm=n_perm)
    t3_slope = fixed_effects_slope(_pairs(groups, change, damage), n_perm=n_perm)
    widths = sorted({int(b) for f in files for b in f["widths"]})
    metrics = [m for m in ("d_loss", "damage_per_routed_token", "d_loss_routed", "d_loss_rare", "d_acc",
                           "d_exact_match") if any(m in x["by_width"][str(widths[0])] for g in groups for x in g)]
    secondary = {}
    for b in widths:
        for m in metrics:
            for p in PREDICTORS:
                t = spearman_groups(_pairs(groups, lambda x: sensitivity_of(x, b, m), lambda x: x.get(p)),
                                    n_perm=n_perm)
                secondary[f"{m}@{b}|{p}"] = {k: t[k] for k in ("stat", "p_neg", "p_pos", "groups")}
    excluded = sum(1 for g in groups for x in g if x["routed"] == 0)
    # descriptive, added after the first results: does a small change (norm) mark a rarely routed expert?
    for score in ("router_norm_change", "router_norm"):
        secondary[f"{score}|routed"] = {k: v for k, v in spearman_groups(
            _pairs(groups, lambda x: x.get(score), lambda x: x["routed"]), n_perm=n_perm).items() if k != "per_group"}
    return {"primary_width": primary_width, "models": [f["name"] for f in files], "groups": len(groups),
            "experts": sum(len(g) for g in groups), "no_routed_tokens": excluded,
            "T1": t1, "T2": t2, "T3": t3, "T3_slope": t3_slope, "decision": decide(t1, t3),
            "secondary": secondary, "widths": widths, "metrics": metrics}


def _p(t: dict) -> str:
    return f"p_neg {t['p_neg']:.4f}, p_pos {t['p_pos']:.4f}"


def markdown(result: dict, title: str, command: str) -> str:
    r, b = result, result["primary_width"]
    out = [f"# {title}", "", f"- command: `{command}`",
           f"- models: {', '.join(r['models'])}; {r['groups']} groups (model x MoE layer), {r['experts']} experts "
           f"({r['no_routed_tokens']} without routed held-out tokens: out of T2/T3)",
           f"- sensitivity: change of mean held-out token loss with only that expert at {b} bits; damage per "
           f"routed token: the summed loss change over all held-out tokens / the expert's routed tokens",
           f"- p-values: {N_PERM} permutations within groups, one-sided (p_neg: the paper's direction)", "",
           "| test | statistic | p |", "|---|---|---|",
           f"| T1 rho(sensitivity, router-norm change) | {r['T1']['stat']:+.3f} | {_p(r['T1'])} |",
           f"| T2 partial rho, controlling routed tokens | {r['T2']['stat']:+.3f} | {_p(r['T2'])} |",
           f"| T3 rho(damage per routed token, router-norm change) | {r['T3']['stat']:+.3f} | {_p(r['T3'])} |",
           f"| T3 fixed-effects OLS slope (nats per routed token per unit change) | {r['T3_slope']['slope']:+.4g} | "
           f"{_p(r['T3_slope'])} |", "", f"**Decision (pre-registered rule): {r['decision']}.**", "",
           "Routed held-out tokens vs router-norm change / trained router norm, pooled within-layer Spearman rho "
           "(descriptive, added after the first results): " + " / ".join(
               f"{t['stat']:+.3f} ({_p(t)})" for t in (r["secondary"]["router_norm_change|routed"],
                                                     r["secondary"]["router_norm|routed"])), "",
           "## Secondary: pooled within-layer Spearman rho of each sensitivity with each expert score", "",
           "(larger sensitivity = more damage: accuracy and exact-match changes are negated; p two-sided "
           "= 2 min(p_neg, p_pos))", "",
           "| sensitivity @ bits | " + " | ".join(PREDICTORS.values()) + " |", "|---|" + "---|" * len(PREDICTORS)]
    for w in r["widths"]:
        for m in r["metrics"]:
            cells = []
            for p in PREDICTORS:
                t = r["secondary"].get(f"{m}@{w}|{p}")
                cells.append("-" if not t or not t["groups"] else
                             f"{t['stat']:+.2f} ({min(1.0, 2 * min(t['p_neg'], t['p_pos'])):.3f})")
            out.append(f"| {m} @ {w} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def plot(files: list[dict], result: dict, path: str, title: str) -> bool:
    """Sensitivity (and damage per routed token) vs router-norm change: raw values, one colour
    per group, and within-group ranks pooled. False without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    b = result["primary_width"]
    groups = groups_of(files)
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    panels = (("d_loss", f"Δ held-out loss, expert alone at {b} bits", axes[0]),
              ("damage_per_routed_token", f"damage per routed token at {b} bits", axes[2]))
    for metric, label, ax in panels:
        for k, g in enumerate(groups):
            pts = sorted((x["router_norm_change"], sensitivity_of(x, b, metric)) for x in g
                         if x.get("router_norm_change") is not None and sensitivity_of(x, b, metric) is not None)
            if pts:
                ax.plot(*zip(*pts), "o", ms=3, alpha=0.7, color=f"C{k % 10}")
        ax.set_xlabel("router-norm change (trained − reference)")
        ax.set_ylabel(label)
        ax.set_yscale("symlog", linthresh=1e-3)
        ax.grid(alpha=0.3)
    ax = axes[1]
    rng = np.random.default_rng(0)
    for a, s in _pairs(groups, lambda x: x.get("router_norm_change"), lambda x: sensitivity_of(x, b, "d_loss")):
        ax.scatter(ranks(a) + rng.uniform(-0.15, 0.15, len(a)), ranks(s) + rng.uniform(-0.15, 0.15, len(a)), s=10,
                   alpha=0.5)
    t1 = result["T1"]
    ax.set_title(f"within-layer ranks: pooled rho {t1['stat']:+.2f} (p_neg {t1['p_neg']:.3f})", fontsize=9)
    ax.set_xlabel("rank of router-norm change in its layer")
    ax.set_ylabel(f"rank of Δ loss at {b} bits in its layer")
    ax.grid(alpha=0.3)
    axes[0].set_title(f"{title}: decision {result['decision']}", fontsize=9)
    axes[2].set_title(f"T3 rho {result['T3']['stat']:+.2f} (p_neg {result['T3']['p_neg']:.3f})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
