"""The tag job's wall time on a demo-sized root: the job as an operator runs it, in its own process.

    .venv/bin/python -m bench.bench_tag [--tracks 300] [--tags 17] [--runs 2] [--repo PATH]
    .venv/bin/python -m bench.bench_tag --phases     # this checkout, in-process, per phase

Builds a root of synthetic embeddings that follow their tags (``musiclib.datasets.tagged_embeddings``, the
demo's size by default) and a probe set fitted as the tune job fits it, then runs ``python -m jobs.tag``
in ``--repo`` (default: this checkout) ``--runs`` times, each on a fresh copy of the root, and prints the
wall time of each run and of its no-op re-run. Comparing two checkouts (``--repo``) on the same machine
gives what a change of the tag job costs; on a loaded machine Ray's start varies more than that, so
``--phases`` runs the job once in this process and times the table's own parts (opening the table,
the commit) beside the scoring, then its no-op re-run. Results: ``docs/BENCHMARKS.md``, "tag".
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from musiclib import catalog
from musiclib.core import storage, versions
from musiclib.core.config import Layout
from musiclib.datasets import tagged_embeddings
from musiclib.embed import table as embeddings_table
from musiclib.probe import fewshot

MODEL = "bench-model"


def make_root(root: str, n_tracks: int, n_tags: int) -> None:
    """Catalog, embeddings and a published probe set (logistic regression on all labels)."""
    cat, emb = tagged_embeddings.make(n_tracks=n_tracks, n_tags=n_tags, dim=64, n_errors=3, model_id=MODEL)
    layout = Layout(root)
    catalog.write(cat, layout.catalog)
    embeddings_table.publish_table(layout.embeddings, MODEL, "v1", emb)
    probe_set = fewshot.final_probe_set(
        fewshot.prepare(cat, emb, MODEL),
        {"budget": "all", "probe": "logreg", "norm": "standardize", "C": 1.0},
    )
    uri = storage.join(versions.version_uri(layout.probes, "tune-bench"), "probe_set.safetensors")
    probe_set.save(uri)
    versions.publish(layout.probes, "tune-bench", [uri], [len(probe_set.tags)])


def timed(cmd: list[str], cwd: str) -> float:
    began = time.perf_counter()
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": cwd})
    if out.returncode != 0:
        raise SystemExit(f"{cmd} failed:\n{out.stdout[-2000:]}{out.stderr[-2000:]}")
    return time.perf_counter() - began


def phases(root: str) -> None:
    """The tag job in this process: seconds spent opening the table, scoring (Ray), committing; the no-op."""
    from jobs import tag as tag_job
    from musiclib.tag import tag_table

    spent: dict[str, float] = {}

    def timing(module: object, name: str) -> None:
        inner = getattr(module, name)

        def timed_call(*args, **kwargs):
            began = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                spent[name] = spent.get(name, 0.0) + time.perf_counter() - began

        setattr(module, name, timed_call)

    for module, name in ((tag_table, "open_table"), (tag_job, "score_with_ray"), (tag_table, "commit")):
        timing(module, name)
    began = time.perf_counter()
    tag_job.main(["--root", root, "--num-cpus", "2"])
    total = time.perf_counter() - began
    began = time.perf_counter()
    tag_job.main(["--root", root])
    again = time.perf_counter() - began
    parts = ", ".join(f"{name} {s:.2f} s" for name, s in spent.items())
    print(f"tag in-process: {total:.1f} s ({parts}); no-op re-run {again:.2f} s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tracks", type=int, default=300)
    parser.add_argument("--tags", type=int, default=17)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--repo", default=str(Path(__file__).resolve().parents[1]))
    parser.add_argument("--phases", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        template = str(Path(tmp) / "template")
        make_root(template, args.tracks, args.tags)
        if args.phases:
            phases(template)
            return
        for i in range(args.runs):
            root = str(Path(tmp) / f"run{i}")
            shutil.copytree(template, root)
            cmd = [sys.executable, "-m", "jobs.tag", "--root", root, "--num-cpus", "2"]
            first, again = timed(cmd, args.repo), timed(cmd, args.repo)
            print(f"{args.repo}: run {i}: tag {first:.1f} s, no-op re-run {again:.1f} s", flush=True)


if __name__ == "__main__":
    main()
