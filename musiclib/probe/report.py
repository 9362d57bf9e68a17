"""What a label-budget sweep buys: per-budget tables, chosen configurations, cheapest budgets per tag, plot.

Input is the sweep's long table (one row per trial, repetition and tag, with validation and test metrics;
see ``fewshot.run_config``). Macro metrics are means over the tags evaluated in a repetition (skipped tags
are nan and left out), then mean and standard deviation over repetitions.

Every choice (the configuration of each budget, of each probe at each budget, each tag's cheapest
budget) is made on the validation split; the test split only reports the chosen ones, so its scores are
not inflated by picking the luckiest of many configurations on the very tracks that measure them.
"""

from __future__ import annotations

import io
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from musiclib.core import storage, versions  # noqa: E402

METRICS = ("ap", "roc_auc")
GROUPS = ("all", "head", "tail")
SPLITS = ("valid", "test")
SELECT_BY = "valid_ap_all_mean"  # the summary column every choice maximises
CHEAPEST_COLUMNS = [
    "tag", "group", "cheapest_budget",
    "valid_ap_at_budget", "valid_full_ap", "test_ap_at_budget", "test_full_ap",
]  # fmt: skip


def budget_order(budget: str) -> float:
    """Sort key for budgets: integers ascending, ``all`` last."""
    return float("inf") if budget == "all" else float(budget)


def trial_summary(results: pd.DataFrame) -> pd.DataFrame:
    """One row per trial: macro AP and ROC-AUC per split (valid, test) and tag group (all, head, tail), as
    mean and std over repetitions, in columns ``<split>_<metric>_<group>_<mean|std>``, beside the trial's
    budget, probe, representation (results of sweeps before there was a choice: the learned embedding),
    normalisation and hyperparameters."""
    if "representation" not in results:
        results = results.assign(representation="embedding")
    columns = [f"{split}_{metric}" for split in SPLITS for metric in METRICS]
    per_rep = []
    for group in GROUPS:
        rows = results if group == "all" else results[results["group"] == group]
        macro = rows.groupby(["trial", "rep"])[columns].mean()
        per_rep.append(macro.add_suffix(f"_{group}"))
    reps = pd.concat(per_rep, axis=1)
    summary = reps.groupby("trial").agg(["mean", "std"])
    summary.columns = [f"{m}_{stat}" for m, stat in summary.columns]
    summary = summary.fillna({c: 0.0 for c in summary.columns if c.endswith("_std")})
    info = results.groupby("trial")[["budget", "probe", "representation", "norm", "params"]].first()
    info["n_support"] = results.groupby("trial")["n_support"].mean()
    info["fit_s"] = results.groupby("trial")["fit_s"].sum()
    out = info.join(summary).reset_index()
    return out.sort_values(["budget", SELECT_BY], key=_sort_key, ascending=[True, False])


def _sort_key(col: pd.Series) -> pd.Series:
    return col.map(budget_order) if col.name == "budget" else col


def best_per_budget(summary: pd.DataFrame) -> pd.DataFrame:
    """The configuration with the highest mean validation macro AP at each budget, budgets ascending."""
    best = summary.loc[summary.groupby("budget")[SELECT_BY].idxmax()]
    return best.sort_values("budget", key=lambda c: c.map(budget_order)).reset_index(drop=True)


def cheapest_budgets(results: pd.DataFrame, best: pd.DataFrame, tolerance: float) -> pd.DataFrame:
    """Per tag: the smallest budget whose chosen configuration's AP is within ``tolerance`` of full labels.

    The budget is chosen on the validation split (each budget's configuration from ``best``, the tag's
    validation AP averaged over repetitions against its full-label validation AP); the test AP at that
    budget and at full labels is reported beside it. Tags without a full-label validation AP (no positive
    or no negative among the validation tracks) cannot be placed and are left out.
    """
    chosen = results[results["trial"].isin(best["trial"])]
    per_tag = {s: chosen.groupby(["budget", "tag"])[f"{s}_ap"].mean().unstack("budget") for s in SPLITS}
    valid, test = per_tag["valid"], per_tag["test"]
    if "all" not in valid.columns:
        return pd.DataFrame(columns=CHEAPEST_COLUMNS)
    budgets = sorted(valid.columns, key=budget_order)
    groups = results.groupby("tag")["group"].first()
    rows = []
    for tag, aps in valid.iterrows():
        full = aps["all"]
        if np.isnan(full):
            continue
        cheapest = next(b for b in budgets if not np.isnan(aps[b]) and aps[b] >= full - tolerance)
        rows.append(
            {
                "tag": tag,
                "group": groups[tag],
                "cheapest_budget": cheapest,
                "valid_ap_at_budget": aps[cheapest],
                "valid_full_ap": full,
                "test_ap_at_budget": test.loc[tag, cheapest],
                "test_full_ap": test.loc[tag, "all"],
            }
        )
    table = pd.DataFrame(rows, columns=CHEAPEST_COLUMNS)
    return table.sort_values(["group", "tag"]).reset_index(drop=True)


def plot_budget_curve(best: pd.DataFrame, uri: str, repetitions: int | None = None) -> None:
    """Test macro AP and ROC-AUC of each budget's chosen configuration by budget: all, head and tail tags.

    ``best`` holds the configurations chosen on the validation split (``best_per_budget``). Lines are means
    over repetitions (``repetitions`` of them, when given, named in the caption), shaded bands plus or
    minus one standard deviation; ``all`` (every labeled training track) sits at the right end. The
    caption names the representation each budget chose. Sized to stay readable at the width of a README
    (fonts of 11 pt on a 9 inch figure).
    """
    labels = list(best["budget"])
    xs = np.arange(len(labels))
    with plt.rc_context({"font.size": 11, "axes.titlesize": 12, "legend.fontsize": 10}):
        fig, axes = plt.subplots(1, 2, figsize=(9, 4), sharex=True)
        panels = (("average precision (AP)", "test macro AP"), ("ROC-AUC", "test macro ROC-AUC"))
        for ax, metric, (title, ylabel) in zip(axes, METRICS, panels, strict=True):
            for group, style in zip(GROUPS, ("-", "--", ":"), strict=True):
                mean = best[f"test_{metric}_{group}_mean"].to_numpy(float)
                std = best[f"test_{metric}_{group}_std"].to_numpy(float)
                (line,) = ax.plot(xs, mean, style, marker="o", label=f"{group} tags")
                ax.fill_between(xs, mean - std, mean + std, alpha=0.2, color=line.get_color())
            if metric == "roc_auc":
                ax.axhline(0.5, color="grey", linewidth=1, linestyle="-.", label="chance")
            ax.set_xticks(xs, labels)
            ax.set_xlabel("label budget (positive tracks per tag)")
            ax.set_ylabel(f"{ylabel} (0 to 1)")
            ax.set_title(title)
            ax.grid(alpha=0.3)
            ax.legend(loc="best")
        reps = f"{repetitions} repetitions" if repetitions else "repetitions"
        chosen = ", ".join(f"{b} {r}" for b, r in zip(best["budget"], best["representation"], strict=True))
        fig.text(
            0.5,
            0.01,
            f"Lines: mean over {reps} (new support sets each); bands: ± 1 standard deviation. "
            "Each budget's probe chosen on the validation split; 'all': every labeled training track. "
            f"Representation chosen per budget: {chosen}.",
            ha="center",
            fontsize=9,
            wrap=True,
        )
        fig.tight_layout(rect=(0, 0.06, 1, 1))
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
        plt.close(fig)
    storage.write_bytes(uri, buf.getvalue())


def plot_run(probes_root: str, out: str, run_id: str | None = None) -> str:
    """Draw the budget curve of a published probe run (default: the latest) from its ``results.parquet``.

    The same figure the tune job writes beside its report, drawn again (e.g. for ``docs/``) without
    running the sweep; returns the run id.
    """
    run_id = run_id or versions.latest_version(probes_root)
    if run_id is None:
        raise SystemExit(f"no published probe run under {probes_root}: run tune first")
    results = storage.read_parquet(
        [storage.join(versions.version_uri(probes_root, run_id), "results.parquet")]
    )
    frame = results.to_pandas()
    plot_budget_curve(best_per_budget(trial_summary(frame)), out, int(frame["rep"].nunique()))
    return run_id


def _fmt(mean: float, std: float) -> str:
    return "n/a" if np.isnan(mean) else f"{mean:.3f} ± {std:.3f}"


def _num(value: float) -> str:
    return "n/a" if np.isnan(value) else f"{value:.3f}"


def _config_name(row: Any) -> str:
    return f"{row.probe} / {row.norm}" + (f" / {row.params}" if row.params else "")


def render_markdown(
    summary: pd.DataFrame,
    best: pd.DataFrame,
    cheapest: pd.DataFrame,
    facts: dict[str, Any],
    tolerance: float,
) -> str:
    """The report: run facts, chosen configuration per budget, each probe per budget, cheapest budgets."""
    lines = [f"# Few-shot probe sweep `{facts['run_id']}`", ""]
    lines += [
        "Configurations and per-tag budgets are chosen on the validation split (macro AP, mean over "
        "repetitions); the test split only reports the chosen ones.",
        "",
    ]
    lines += [f"- {k}: {v}" for k, v in facts.items() if k != "run_id"]
    lines += ["", "## Chosen configuration per budget", ""]
    lines += [
        "The representation is what the probes read: the learned `embedding`, the `logmel` statistics, or "
        "both side by side, each part standardised (`fused`).",
        "",
        "| budget | configuration | representation | support tracks | valid macro AP | test macro AP "
        "| test macro ROC-AUC | test head AP | test tail AP |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in best.itertuples():
        cells = [
            _fmt(r.valid_ap_all_mean, r.valid_ap_all_std),
            _fmt(r.test_ap_all_mean, r.test_ap_all_std),
            _fmt(r.test_roc_auc_all_mean, r.test_roc_auc_all_std),
            _fmt(r.test_ap_head_mean, r.test_ap_head_std),
            _fmt(r.test_ap_tail_mean, r.test_ap_tail_std),
        ]
        lines.append(
            f"| {r.budget} | {_config_name(r)} | {r.representation} | {r.n_support:.0f} | "
            + " | ".join(cells)
            + " |"
        )
    lines += [
        "",
        "## Each probe per budget (test macro AP, mean ± std over repetitions, of the probe's "
        "configuration with the best validation macro AP)",
        "",
    ]
    probe_best = summary.loc[summary.groupby(["budget", "probe"])[SELECT_BY].idxmax()]
    table = probe_best.pivot(index="budget", columns="probe", values=["test_ap_all_mean", "test_ap_all_std"])
    probes = sorted(summary["probe"].unique())
    lines += ["| budget | " + " | ".join(probes) + " |", "|---" * (len(probes) + 1) + "|"]
    for budget in sorted(table.index, key=budget_order):
        cells = [
            _fmt(table.loc[budget, ("test_ap_all_mean", p)], table.loc[budget, ("test_ap_all_std", p)])
            for p in probes
        ]
        lines.append(f"| {budget} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"## Cheapest budget within {tolerance} validation AP of the full-label result, per tag",
        "",
    ]
    lines += [
        "| tag | group | cheapest budget | valid AP there | valid AP, full labels | test AP there "
        "| test AP, full labels |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in cheapest.itertuples():
        lines.append(
            f"| {r.tag} | {r.group} | {r.cheapest_budget} | {_num(r.valid_ap_at_budget)} "
            f"| {_num(r.valid_full_ap)} | {_num(r.test_ap_at_budget)} | {_num(r.test_full_ap)} |"
        )
    lines += ["", "![budget curve](budget_curve.png)", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """``python -m musiclib.probe.report budget-curve OUT.png [--root ROOT] [--run-id RUN]``: draw a probe
    run's budget curve (default: the latest run; the README's figure comes from it, ``make docs-images``).

    The study's commands (``study-runs``, ``study-plot``) are ``python -m musiclib.study.study``.
    """
    import sys

    from musiclib.core.config import DEFAULT_ROOT, Layout, take_flags

    usage = "usage: python -m musiclib.probe.report budget-curve OUT.png [--root ROOT] [--run-id RUN]"
    args = list(sys.argv[1:] if argv is None else argv)
    options = {"--root": DEFAULT_ROOT, "--run-id": None}
    take_flags(args, options, usage)
    if len(args) != 2 or args[0] != "budget-curve":
        raise SystemExit(usage)
    root, out = storage.normalize_uri(options["--root"]), storage.normalize_uri(args[1])
    run_id = plot_run(Layout(root).probes, out, options["--run-id"])
    print(f"budget curve of probe run {run_id} under {root}: {args[1]}")


if __name__ == "__main__":
    main()
