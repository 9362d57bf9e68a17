"""What to label next: margins equal a float64 reference, blocks merge exactly, labeled tracks and
near-duplicates are never suggested, bad tags fail before any write, the job is versioned and idempotent."""

from __future__ import annotations

import functools

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from conftest import SYNTHETIC_MODEL, publish_probe_set, write_synthetic_root

from jobs import suggest as suggest_job
from musiclib import catalog
from musiclib.core import iceberg, storage, versions
from musiclib.core.config import ConfigError, Layout, parse
from musiclib.datasets import tagged_embeddings
from musiclib.embed import table as embeddings_table
from musiclib.probe import fewshot
from musiclib.tag import suggest, tags
from musiclib.tag.suggest import SuggestConfig


@functools.cache
def _corpus() -> tuple[pa.Table, pa.Table]:
    return tagged_embeddings.make(n_tracks=200, n_tags=6, dim=8, noise=1.0, seed=3, model_id=SYNTHETIC_MODEL)


@functools.cache
def _fit(probe: str, norm: str):
    cat, emb = _corpus()
    data = fewshot.prepare(cat, emb, SYNTHETIC_MODEL)
    return data, fewshot.final_probe_set(data, {"budget": "all", "probe": probe, "norm": norm})


@pytest.fixture
def corpus():
    """A small synthetic catalog (60 % labeled) and its embeddings."""
    return _corpus()


def fitted(probe: str = "logreg", norm: str = "standardize"):
    """The corpus's labels and a probe set fitted on all its training labels (fitted once per module)."""
    return _fit(probe, norm)


def ids_and_x(emb: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    return np.array(emb["track_id"].to_pylist()), np.array(emb["embedding"].to_pylist(), np.float32)


@pytest.mark.parametrize("probe,norm", [("logreg", "standardize"), ("centroid", "l2")])
def test_scores_equal_float64_reference(corpus, probe, norm):
    """score = exp(-|logit - logit(t)|) (probabilities) or exp(-|cosine - t|) (centroid), from the arrays."""
    _, probe_set = fitted(probe, norm)
    ids, x = ids_and_x(corpus[1])
    cols = np.arange(len(probe_set.tags))
    cand = suggest.block_candidates(ids, x, probe_set, cols, pool=len(ids))
    thresholds = dict(zip(probe_set.tags, probe_set.thresholds.tolist()))
    table = suggest.select(cand, probe_set.tags, thresholds, per_tag=len(ids), max_similarity=1.0)

    x64 = x.astype(np.float64)
    nrm = probe_set.norm
    if nrm.pre_l2:
        x64 = x64 / np.linalg.norm(x64, axis=1, keepdims=True)
    z = (x64 - nrm.mean.astype(np.float64)) / nrm.scale.astype(np.float64)
    if nrm.post_l2:
        z = z / np.linalg.norm(z, axis=1, keepdims=True)
    logits = z @ probe_set.weights.astype(np.float64) + probe_set.biases.astype(np.float64)
    t = probe_set.thresholds.astype(np.float64)
    if probe == "logreg":
        t = np.log(t / (1 - t))
    expected = np.exp(-np.abs(logits - t))
    row = {tid: i for i, tid in enumerate(ids)}
    rows = table.to_pylist()
    assert len(rows) > len(probe_set.tags)
    for r in rows:
        j = probe_set.tags.index(r["tag"])
        np.testing.assert_allclose(r["score"], expected[row[r["track_id"]], j], rtol=2e-5, atol=1e-6)
    margins = cand.to_pandas().groupby("tag")["margin"]
    assert (margins.apply(lambda m: np.all(np.diff(m.to_numpy()) >= 0))).all()  # most uncertain first


def test_blocks_merge_to_the_whole_and_are_deterministic(corpus):
    """Per-block pools merged in any order equal the pool of one block; the selection repeats exactly."""
    _, probe_set = fitted()
    ids, x = ids_and_x(corpus[1])
    cols = np.arange(len(probe_set.tags))
    x[50] = x[10]  # an exact tie in margin: the smaller id wins in both paths
    whole = suggest.merge_candidates(None, suggest.block_candidates(ids, x, probe_set, cols, 7), 7)
    for order in (range(0, 200, 30), reversed(range(0, 200, 30))):
        merged = None
        for s in order:
            block = suggest.block_candidates(ids[s : s + 30], x[s : s + 30], probe_set, cols, 7)
            merged = suggest.merge_candidates(merged, block, 7)
        assert merged.equals(whole)
    thresholds = dict(zip(probe_set.tags, probe_set.thresholds.tolist()))
    first = suggest.select(whole, probe_set.tags, thresholds, 3, 0.9)
    assert first.equals(suggest.select(whole, probe_set.tags, thresholds, 3, 0.9))
    assert first.column("rank").to_pylist()[:3] == [1, 2, 3]


def test_near_duplicates_never_share_a_batch(corpus):
    """Copies of the most uncertain track would fill the batch without the cap; with it, one survives."""
    _, probe_set = fitted()
    ids, x = ids_and_x(corpus[1])
    cols = np.array([0])
    top = suggest.block_candidates(ids, x, probe_set, cols, 1)["track_id"][0].as_py()
    rng = np.random.default_rng(0)
    copies = x[ids == top] + 1e-2 * rng.normal(size=(5, x.shape[1])).astype(np.float32)
    ids2 = np.r_[ids, [f"zcopy{i}" for i in range(5)]]
    x2 = np.r_[x, copies]
    cand = suggest.block_candidates(ids2, x2, probe_set, cols, 30)
    thresholds = {probe_set.tags[0]: float(probe_set.thresholds[0])}
    loose = suggest.select(cand, [probe_set.tags[0]], thresholds, 6, 1.0)["track_id"].to_pylist()
    assert sum(t == top or t.startswith("zcopy") for t in loose) == 6  # the test can fail
    picked = suggest.select(cand, [probe_set.tags[0]], thresholds, 6, 0.9)["track_id"].to_pylist()
    assert sum(t == top or t.startswith("zcopy") for t in picked) == 1 and len(picked) == 6
    v = suggest._unit(probe_set.norm(x2[[list(ids2).index(t) for t in picked]]))
    sims = v @ v.T
    assert (sims[~np.eye(len(picked), dtype=bool)] < 0.9).all()


def test_labeled_and_failed_tracks_are_never_candidates(tmp_path, corpus):
    """The scoring actor (called here without Ray) drops labeled tracks and embedding errors."""
    root = str(tmp_path)
    cat, emb = write_synthetic_root(root, n_tracks=120)
    publish_probe_set(root, cat, emb)
    inputs = tags.find_inputs(Layout(root))
    wanted, labeled = suggest.targets(suggest.SuggestConfig(root=root), Layout(root), inputs)
    block = suggest_job.CandidateBlock(inputs.probe_uri, wanted, 1000, labeled)(emb)
    got = set(block["track_id"].to_pylist())
    failed = {t for t, e in zip(emb["track_id"].to_pylist(), emb["error"].to_pylist()) if e}
    unlabeled = {t for t, g in zip(cat["track_id"].to_pylist(), cat["tags"].to_pylist()) if not g}
    assert got == unlabeled - failed and failed and labeled


FUSED = {"budget": "all", "probe": "logreg", "representation": "fused", "norm": "standardize"}


def test_a_fused_probe_set_suggests_from_the_vectors_it_scores(tmp_path):
    """With a probe set chosen on fused, the scoring actor (without Ray) reads the embedding and the
    statistics side by side: its candidates, margins and diversity vectors are those of that matrix."""
    root = str(tmp_path)
    cat, emb = write_synthetic_root(root, n_tracks=120, logmel_dim=5)
    publish_probe_set(root, cat, emb, config=FUSED)
    inputs = tags.find_inputs(Layout(root))
    assert inputs.probe_set.representation == "fused"
    wanted, labeled = suggest.targets(suggest.SuggestConfig(root=root), Layout(root), inputs)
    block = suggest_job.CandidateBlock(inputs.probe_uri, wanted, 1000, labeled)(
        emb.select(embeddings_table.columns("fused"))
    )
    rows = emb.filter(
        pc.and_(pc.is_null(emb["error"]), pc.invert(pc.is_in(emb["track_id"], pa.array(sorted(labeled)))))
    )
    x = np.hstack([np.array(rows[c].to_pylist(), np.float32) for c in ("embedding", "logmel")])
    columns = np.array([inputs.probe_set.tags.index(t) for t in wanted])
    want = suggest.block_candidates(
        np.array(rows["track_id"].to_pylist()), x, inputs.probe_set, columns, 1000
    )
    assert block.equals(want) and block.schema.field("vector").type.list_size == 16 + 5
    z = (x.astype(np.float64) - inputs.probe_set.norm.mean) / inputs.probe_set.norm.scale
    first = {t: i for i, t in enumerate(rows["track_id"].to_pylist())}[block["track_id"][0].as_py()]
    np.testing.assert_allclose(
        block["vector"][0].as_py(), z[first] / np.linalg.norm(z[first]), rtol=1e-4, atol=1e-5
    )


def test_bad_tags_and_config_fail_before_any_write(tmp_path, monkeypatch):
    root = str(tmp_path)
    cat, emb = write_synthetic_root(root, n_tracks=120)
    # a tag carried only by a validation track: known to the catalog, but the probe set has no probe for it
    tags = cat["tags"].to_pylist()
    i = next(i for i, s in enumerate(cat["split"].to_pylist()) if s == "valid" and tags[i])
    tags[i] = [*tags[i], "rare_valid_only"]
    cat = cat.set_column(cat.schema.get_field_index("tags"), "tags", pa.array(tags, pa.list_(pa.string())))
    catalog.write(cat, Layout(root).catalog)
    publish_probe_set(root, cat, emb)
    monkeypatch.setattr(suggest_job, "ray_session", lambda *a, **k: pytest.fail("Ray started"))
    for tag, message in (
        ("nosuchtag", "unknown tag 'nosuchtag'"),
        ("rare_valid_only", "tag 'rare_valid_only' has no probe"),
    ):
        with pytest.raises(ConfigError, match=message) as err:
            suggest_job.main(["--root", root, "--tags", f"tag00,{tag}"])
        assert "\n" not in str(err.value)
    for argv in (["--per-tag", "0"], ["--max-similarity", "1.5"], ["--pool-factor", "0"]):
        with pytest.raises(ConfigError, match=argv[0]):
            suggest_job.main(["--root", root, *argv])
    assert versions.latest_version(Layout(root).suggestions) is None
    assert not storage.list_files(Layout(root).suggestions)


def test_simulation_rounds_add_labels(corpus):
    """Each round reveals new labels (never one already known), for both strategies and label kinds."""
    data, _ = fitted()
    probe = {"budget": "all", "probe": "logreg", "norm": "standardize"}
    for strategy, reveal in (("active", "track"), ("random", "track"), ("active", "tag"), ("random", "tag")):
        rows = suggest.simulate(data, strategy, reveal, start_k=1, per_tag=2, rounds=1, seed=0, config=probe)
        n = {(r["round"], r["tag"]): r["n_labels"] for r in rows}
        assert len(n) == 2 * len(data.tags)
        added = [n[(1, t)] - n[(0, t)] for t in data.tags]
        assert all(0 < a <= (2 * len(data.tags) if reveal == "track" else 2) for a in added)
    with pytest.raises(ValueError, match="'greedy'"):
        suggest.simulate(data, "greedy", "tag", 1, 2, 1, 0, probe)
    cat, emb = tagged_embeddings.make(n_tracks=200, n_tags=6, dim=8, noise=1.0, seed=3, logmel_dim=5)
    fused = fewshot.prepare(cat, emb, "synthetic")  # the simulation in the representation of its config
    rows = suggest.simulate(fused, "active", "track", start_k=1, per_tag=2, rounds=1, seed=0, config=FUSED)
    assert len(rows) == 2 * len(fused.tags) and all(0 <= r["ap"] <= 1 for r in rows)


@pytest.mark.slow
def test_suggest_job_writes_a_version_and_reruns_as_a_no_op(tmp_path, capsys):
    """On a probe set chosen on fused: the job reads the statistics beside the embeddings."""
    root = str(tmp_path)
    cat, emb = write_synthetic_root(root, n_tracks=120, logmel_dim=5)
    publish_probe_set(root, cat, emb, config=FUSED)
    first = suggest_job.main(["--root", root, "--per-tag", "4", "--num-cpus", "4", "--batch-size", "32"])
    table = suggest.read_latest(root)
    labeled = {t for t, g in zip(cat["track_id"].to_pylist(), cat["tags"].to_pylist()) if g}
    assert len(table) == 4 * len(set(table["tag"].to_pylist())) and not labeled & set(
        table["track_id"].to_pylist()
    )
    for tag in set(table["tag"].to_pylist()):
        assert suggest.read_latest(root, tag)["rank"].to_pylist() == [1, 2, 3, 4]
    again = suggest_job.main(["--root", root, "--per-tag", "4"])
    assert (again.version, again.created_at) == (first.version, first.created_at)
    assert "nothing: version" in capsys.readouterr().out
    suggest.main(["show", "tag00", "--root", root, "--n", "2"])
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "tag  track_id  rank  score  reason" and len(out) == 3


@pytest.mark.slow
def test_suggest_reads_a_hive_partitioned_catalog_folder(tmp_path, capsys):
    """``--catalog FOLDER``: the labels come from the export (its split from the paths), a re-run with the
    same files writes nothing, and one more file in the export names another run."""
    root = str(tmp_path / "root")
    cat, emb = write_synthetic_root(root, n_tracks=120)
    publish_probe_set(root, cat, emb)
    export = str(tmp_path / "export")
    pads.write_dataset(cat, export, format="parquet", partitioning=["split"], partitioning_flavor="hive")
    storage.delete(Layout(root).catalog)  # the job reads the export, not the root's catalog
    argv = ["--root", root, "--catalog", export, "--per-tag", "4", "--num-cpus", "2"]
    first = suggest_job.main(argv)
    labeled = {t for t, g in zip(cat["track_id"].to_pylist(), cat["tags"].to_pylist()) if g}
    table = suggest.read_latest(root)
    assert len(table) and not labeled & set(table["track_id"].to_pylist())
    again = suggest_job.main(argv)
    assert (again.version, again.created_at) == (first.version, first.created_at)
    assert "nothing: version" in capsys.readouterr().out
    cfg = parse(SuggestConfig, argv)
    layout = Layout(cfg.root, cfg.catalog)
    inputs = tags.find_inputs(layout)
    wanted, _ = suggest.targets(cfg, layout, inputs)
    assert suggest.derive_run_id(cfg, layout, inputs, wanted) == first.version
    extra = cat.slice(0, 1).drop_columns(["split"])
    extra = extra.set_column(extra.schema.get_field_index("track_id"), "track_id", pa.array(["new-track"]))
    pq.write_table(extra, storage.join(export, "split=train", "more.parquet"))
    assert suggest.derive_run_id(cfg, layout, inputs, wanted) != first.version


def test_suggest_reads_its_labels_from_an_iceberg_table(tmp_path):
    """``--catalog iceberg:<namespace>.<table>``: the labeled tracks are the table's, and a new snapshot of
    the table names another version (driver side, before Ray)."""
    root = str(tmp_path / "root")
    cat, emb = write_synthetic_root(root, n_tracks=120)
    publish_probe_set(root, cat, emb)
    storage.delete(Layout(root).catalog)
    found = iceberg.open_catalog("", root, storage.join(root, "tags", "warehouse"), create=True)
    found.create_namespace("team")
    table = found.create_table("team.tracks", schema=catalog.conform(cat).schema)
    table.append(catalog.conform(cat))
    cfg = parse(SuggestConfig, ["--root", root, "--catalog", "iceberg:team.tracks"])
    layout = Layout(cfg.root, cfg.catalog)
    inputs = tags.find_inputs(layout)
    wanted, labeled = suggest.targets(cfg, layout, inputs)
    assert labeled == {t for t, g in zip(cat["track_id"].to_pylist(), cat["tags"].to_pylist()) if g}
    before = suggest.derive_run_id(cfg, layout, inputs, wanted)
    assert suggest.derive_run_id(cfg, layout, inputs, wanted) == before
    new = cat.slice(0, 1)
    table.append(
        catalog.conform(new.set_column(0, catalog.SCHEMA.field("track_id"), pa.array(["new-track"])))
    )
    assert suggest.derive_run_id(cfg, layout, inputs, wanted) != before
