"""What a label-budget sweep buys: per-budget tables, best configurations, per-tag cheapest budgets, the plot.

Input is the sweep's long table (one row per trial, repetition and tag; see ``fewshot.run_config``).
Macro metrics are means over the tags evaluated in a repetition (skipped tags are nan and left out), then
mean and standard deviation over repetitions.
"""

from __future__ import annotations

import io
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from musiclib import storage  # noqa: E402

METRICS = ("ap", "roc_auc")
GROUPS = ("all", "head", "tail")


def budget_order(budget: str) -> float:
    """Sort key for budgets: integers ascending, ``all`` last."""
    return float("inf") if budget == "all" else float(budget)


def trial_summary(results: pd.DataFrame) -> pd.DataFrame:
    """One row per trial: macro AP and ROC-AUC (all tags, head, tail) as mean and std over repetitions."""
    per_rep = []
    for group in GROUPS:
        rows = results if group == "all" else results[results["group"] == group]
        macro = rows.groupby(["trial", "rep"])[list(METRICS)].mean()
        per_rep.append(macro.add_suffix(f"_{group}"))
    reps = pd.concat(per_rep, axis=1)
    summary = reps.groupby("trial").agg(["mean", "std"])
    summary.columns = [f"{m}_{stat}" for m, stat in summary.columns]
    summary = summary.fillna({c: 0.0 for c in summary.columns if c.endswith("_std")})
    info = results.groupby("trial")[["budget", "probe", "norm", "params"]].first()
    info["n_support"] = results.groupby("trial")["n_support"].mean()
    info["fit_s"] = results.groupby("trial")["fit_s"].sum()
    out = info.join(summary).reset_index()
    return out.sort_values(["budget", "ap_all_mean"], key=_sort_key, ascending=[True, False])


def _sort_key(col: pd.Series) -> pd.Series:
    return col.map(budget_order) if col.name == "budget" else col


def best_per_budget(summary: pd.DataFrame) -> pd.DataFrame:
    """The configuration with the highest mean macro AP at each budget, budgets ascending."""
    best = summary.loc[summary.groupby("budget")["ap_all_mean"].idxmax()]
    return best.sort_values("budget", key=lambda c: c.map(budget_order)).reset_index(drop=True)


def cheapest_budgets(results: pd.DataFrame, best: pd.DataFrame, tolerance: float) -> pd.DataFrame:
    """Per tag: the smallest budget whose best configuration's AP is within ``tolerance`` of full labels.

    Uses each budget's best configuration (by macro AP) and the tag's AP averaged over repetitions; tags
    without a full-label AP (skipped on the test split) are left out.
    """
    chosen = results[results["trial"].isin(best["trial"])]
    per_tag = chosen.groupby(["budget", "tag"])["ap"].mean().unstack("budget")
    budgets = sorted(per_tag.columns, key=budget_order)
    if "all" not in per_tag.columns:
        return pd.DataFrame(columns=["tag", "group", "full_ap", "cheapest_budget", "ap_at_budget"])
    groups = results.groupby("tag")["group"].first()
    rows = []
    for tag, aps in per_tag.iterrows():
        full = aps["all"]
        if np.isnan(full):
            continue
        cheapest = next(b for b in budgets if not np.isnan(aps[b]) and aps[b] >= full - tolerance)
        rows.append(
            {
                "tag": tag,
                "group": groups[tag],
                "full_ap": full,
                "cheapest_budget": cheapest,
                "ap_at_budget": aps[cheapest],
            }
        )
    return pd.DataFrame(rows).sort_values(["group", "tag"]).reset_index(drop=True)


def plot_budget_curve(best: pd.DataFrame, uri: str) -> None:
    """Macro AP and ROC-AUC of each budget's best configuration against budget: all, head and tail tags.

    Shaded bands are plus or minus one standard deviation over repetitions; ``all`` sits at the right end.
    """
    labels = list(best["budget"])
    xs = np.arange(len(labels))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharex=True)
    for ax, metric, title in zip(axes, METRICS, ("macro average precision", "macro ROC-AUC"), strict=True):
        for group, style in zip(GROUPS, ("-", "--", ":"), strict=True):
            mean = best[f"{metric}_{group}_mean"].to_numpy(float)
            std = best[f"{metric}_{group}_std"].to_numpy(float)
            ax.plot(xs, mean, style, marker="o", label=f"{group} tags")
            ax.fill_between(xs, mean - std, mean + std, alpha=0.2)
        ax.set_xticks(xs, labels)
        ax.set_xlabel("label budget (positives per tag)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    storage.write_bytes(uri, buf.getvalue())


def _fmt(mean: float, std: float) -> str:
    return "n/a" if np.isnan(mean) else f"{mean:.3f} ± {std:.3f}"


def _config_name(row: Any) -> str:
    return f"{row.probe} / {row.norm}" + (f" / {row.params}" if row.params else "")


def render_markdown(
    summary: pd.DataFrame,
    best: pd.DataFrame,
    cheapest: pd.DataFrame,
    facts: dict[str, Any],
    tolerance: float,
) -> str:
    """The report: run facts, best configuration per budget, each probe by budget, per-tag cheapest budget."""
    lines = [f"# Few-shot probe sweep `{facts['run_id']}`", ""]
    lines += [f"- {k}: {v}" for k, v in facts.items() if k != "run_id"]
    lines += ["", "## Best configuration per budget", ""]
    lines += [
        "| budget | best configuration | support tracks | macro AP | macro ROC-AUC | head AP | tail AP |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in best.itertuples():
        lines.append(
            f"| {r.budget} | {_config_name(r)} | {r.n_support:.0f} | {_fmt(r.ap_all_mean, r.ap_all_std)} "
            f"| {_fmt(r.roc_auc_all_mean, r.roc_auc_all_std)} | {_fmt(r.ap_head_mean, r.ap_head_std)} "
            f"| {_fmt(r.ap_tail_mean, r.ap_tail_std)} |"
        )
    lines += ["", "## Best of each probe per budget (macro AP, mean ± std over repetitions)", ""]
    probe_best = summary.loc[summary.groupby(["budget", "probe"])["ap_all_mean"].idxmax()]
    table = probe_best.pivot(index="budget", columns="probe", values=["ap_all_mean", "ap_all_std"])
    probes = sorted(summary["probe"].unique())
    lines += ["| budget | " + " | ".join(probes) + " |", "|---" * (len(probes) + 1) + "|"]
    for budget in sorted(table.index, key=budget_order):
        cells = [
            _fmt(table.loc[budget, ("ap_all_mean", p)], table.loc[budget, ("ap_all_std", p)]) for p in probes
        ]
        lines.append(f"| {budget} | " + " | ".join(cells) + " |")
    lines += ["", f"## Cheapest budget within {tolerance} AP of the full-label result, per tag", ""]
    lines += ["| tag | group | full-label AP | cheapest budget | AP there |", "|---|---|---|---|---|"]
    for r in cheapest.itertuples():
        lines.append(
            f"| {r.tag} | {r.group} | {r.full_ap:.3f} | {r.cheapest_budget} | {r.ap_at_budget:.3f} |"
        )
    lines += ["", "![budget curve](budget_curve.png)", ""]
    return "\n".join(lines)
