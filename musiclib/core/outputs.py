"""What the query tools print: where a root's outputs are (after the chain's table), and tables as lines.

``print_outputs`` is ``python -m musiclib.tag.tags outputs`` (and ``make demo``'s last table): the summaries
the jobs wrote (``progress.summary``), then the latest version of each output. It reads only what core
knows of a root; the tag stage passes in where its table's current snapshot is.
"""

from __future__ import annotations

import pyarrow as pa

from musiclib.core import progress, storage, versions
from musiclib.core.config import Layout


def print_table(table: pa.Table) -> None:
    """One line per row, floats to three decimals, nulls blank."""
    for row in table.to_pylist():
        cells = ["" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v) for v in row.values()]
        print("  ".join(cells))


def print_outputs(layout: Layout, tag_table: str | None = None) -> None:
    """The chain's table (one row per job, from the summaries the jobs wrote), then where the latest sweep
    report, budget curve, probe set, tag table, suggestions and study report and plot of a root are.

    ``tag_table`` names the tag table's current snapshot (None: the table has none yet).
    """
    runs = progress.read_summaries(layout.root)
    if runs:
        print(progress.chain_table(runs))
        print()
    probes_run = versions.latest_version(layout.probes)
    if probes_run is not None:
        run_dir = versions.version_uri(layout.probes, probes_run)
        for name in ("report.md", "budget_curve.png", "probe_set.safetensors"):
            print(f"{name:<22} {storage.join(run_dir, name)}")
    if tag_table is not None:
        print(f"{'tag table':<22} {tag_table}")
    suggestions = versions.latest_version(layout.suggestions)
    if suggestions is not None:
        print(f"{'suggestions':<22} {versions.version_uri(layout.suggestions, suggestions)}")
    study_run = versions.latest_version(layout.study)
    if study_run is not None:
        for name in ("study.md", "study.png"):
            print(f"{name:<22} {storage.join(versions.version_uri(layout.study, study_run), name)}")
    if probes_run is None and tag_table is None:
        raise SystemExit(f"no probe run and no tag table under {layout.root} yet")
