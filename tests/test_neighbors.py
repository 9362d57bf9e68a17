"""Nearest tracks: the index (``musiclib.tag.index``: exact search against a float64 reference, IVF recall,
the index file, local and S3), the index job's versions, and ``musiclib.tag.tags similar/seed`` with
confirmed labels reaching tune and tag (``catalog.add_labels``)."""

from __future__ import annotations

import threading

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from safetensors.numpy import save as st_save

from jobs import index as index_job
from musiclib import catalog
from musiclib.core import storage, versions
from musiclib.core.config import ConfigError, Layout
from musiclib.datasets import clustered_vectors, tagged_embeddings
from musiclib.embed import table as embeddings_table
from musiclib.probe import fewshot, probes
from musiclib.tag import index, neighbors, tags


def reference(base: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Cosine top-k from the definition, in float64: normalise, every inner product, sort."""
    b = base.astype(np.float64)
    q = queries.astype(np.float64)
    b /= np.linalg.norm(b, axis=1, keepdims=True)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    sims = q @ b.T
    rows = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, rows, axis=1), rows


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / truth.shape[1] for f, t in zip(found, truth, strict=True)]))


def test_exact_search_equals_float64_reference():
    rng = np.random.default_rng(0)
    base, queries = rng.normal(size=(2000, 24)), rng.normal(size=(7, 24))
    want_s, want_r = reference(base, queries, 9)
    got_s, got_r = index.exact_search(index.normalize(base), index.normalize(queries), 9, 301)
    np.testing.assert_array_equal(got_r, want_r)
    np.testing.assert_allclose(got_s, want_s, atol=1e-5)
    small_s, small_r = index.exact_search(index.normalize(base[:4]), index.normalize(queries), 9)
    assert small_r.shape == (7, 4)  # k larger than the base: every row, best first
    np.testing.assert_array_equal(small_r, reference(base[:4], queries, 4)[1])


@pytest.fixture(scope="module")
def clustered() -> tuple[np.ndarray, np.ndarray]:
    both = clustered_vectors.make(6100, 32, n_clusters=20, sub_clusters=10, seed=3)
    return both[:6000], both[6000:]


def test_ivf_recall_on_clustered_vectors(clustered):
    base, queries = clustered
    truth = reference(base, queries, 10)[1]
    ivf = index.build(base, kind="ivf", nlist=64, nprobe=8)
    assert isinstance(ivf, index.IVFIndex) and len(ivf) == len(base)
    assert recall(ivf.search(index.normalize(queries), 10)[1], truth) >= 0.9
    every_cell = index.from_bytes(index.to_bytes(ivf), nprobe=64)
    np.testing.assert_array_equal(every_cell.search(index.normalize(queries), 10)[1], truth)
    np.testing.assert_allclose(ivf.vectors(np.array([5, 4000])), index.normalize(base[[5, 4000]]))
    assert isinstance(index.build(base), index.ExactIndex)  # below EXACT_BELOW: a scan


@pytest.mark.parametrize("where", ["local", "s3"])
def test_index_file_round_trip(clustered, tmp_path, request, where):
    base, queries = clustered
    root = str(tmp_path) if where == "local" else request.getfixturevalue("s3_root")
    q = index.normalize(queries)
    for built in (index.build(base, kind="ivf", nlist=32, nprobe=4), index.build(base[:500])):
        uri = storage.join(root, "index", f"{built.kind}.safetensors")
        storage.write_bytes(uri, index.to_bytes(built))
        loaded = index.from_bytes(storage.read_bytes(uri), uri)
        assert type(loaded) is type(built) and len(loaded) == len(built)
        for got, want in zip(loaded.search(q, 10), built.search(q, 10), strict=True):
            np.testing.assert_array_equal(got, want)


def test_bad_index_files_are_refused(clustered):
    base, _ = clustered
    good = index.build(base[:400], kind="ivf", nlist=4).arrays()
    meta = {"format": index.FORMAT, "kind": "ivf", "nprobe": "2"}
    cases = [
        ("not a readable safetensors", b"\x80\x04\x95 a pickle, not an index"),
        ("not a readable safetensors", index.to_bytes(index.build(base[:50]))[:100]),  # truncated
        ("format", st_save(good, metadata={**meta, "format": "other/9"})),
        ("unknown index kind", st_save(good, metadata={**meta, "kind": "hnsw"})),
        ("nprobe must be a positive integer", st_save(good, metadata={**meta, "nprobe": "-3"})),
        ("not a permutation", st_save({**good, "rows": np.zeros(400, np.int64)}, metadata=meta)),
        ("do not add up", st_save({**good, "list_sizes": good["list_sizes"] + 1}, metadata=meta)),
        (
            "array 'centroids' is missing",
            st_save({k: good[k] for k in good if k != "centroids"}, metadata=meta),
        ),
        ("NaN", st_save({**good, "vectors": np.full_like(good["vectors"], np.nan)}, metadata=meta)),
    ]
    for expected, data in cases:
        with pytest.raises(index.NeighborsError, match=expected):
            index.from_bytes(data, "bucket/index.safetensors")


@pytest.fixture
def root(tmp_path) -> str:
    """A synthetic root: catalog, embeddings ``v1`` of model ``synthetic`` (3 with errors), no index."""
    tagged_embeddings.write_root(str(tmp_path), n_tracks=300, n_errors=3, seed=1)
    return str(tmp_path)


def test_index_job_builds_once_per_embeddings_version(root, capsys):
    first = index_job.main(["--root", root, "--kind", "ivf", "--nlist", "8"])
    dataset = neighbors.index_uri(Layout(root), "synthetic")
    assert first.extra["embedding_version"] == "v1" and first.rows == 2 * 297
    found = neighbors.load(root)
    assert isinstance(found.index, index.IVFIndex) and found.source.startswith("index ")
    again = index_job.main(["--root", root, "--kind", "ivf", "--nlist", "8"])
    assert again.version == first.version and again.created_at == first.created_at
    assert "already complete" in capsys.readouterr().out
    assert versions.committed_versions(dataset) == [first.version]

    cat, emb = tagged_embeddings.make(n_tracks=300, seed=2)
    embeddings_table.publish_table(Layout(root).embeddings, "synthetic", "v2", emb)
    stale = neighbors.load(root)  # new embeddings: the old index is not used
    assert isinstance(stale.index, index.ExactIndex) and "no index" in stale.source
    second = index_job.main(["--root", root, "--kind", "ivf", "--nlist", "8"])
    assert second.version != first.version and second.extra["embedding_version"] == "v2"
    assert neighbors.load(root).source.endswith(second.version)

    with pytest.raises(ConfigError, match="--kind must be auto, exact or ivf"):
        index_job.main(["--root", root, "--kind", "hnsw"])


def cli(capsys, *argv: str) -> list[list[str]]:
    tags.main(list(argv))
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("# ")  # which index answered
    return [line.split("  ") for line in lines[1:]]


def test_similar_and_seed_print_the_nearest_tracks(root, capsys):
    _, emb = tagged_embeddings.make(n_tracks=300, n_errors=3, seed=1)
    ok = emb.slice(0, 297)
    ids = np.asarray(ok["track_id"].to_pylist())
    vectors = np.asarray(ok["embedding"].to_pylist())

    rows = cli(capsys, "similar", "t00010", "--root", root, "--n", "5")
    assert rows[0] == ["track_id", "score", "tags"] and len(rows) == 6
    sims, order = reference(vectors, vectors[[10]], 6)
    assert [r[0] for r in rows[1:]] == list(ids[order[0][1:]])  # itself left out
    np.testing.assert_allclose([float(r[1]) for r in rows[1:]], sims[0][1:], atol=1e-3)

    rows = cli(capsys, "seed", "brass", "--examples", "t00010,t00020", "--root", root, "--n", "4")
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    _, order = reference(vectors, unit[[10, 20]].mean(axis=0, keepdims=True), 6)
    want = [t for t in ids[order[0]] if t not in ("t00010", "t00020")][:4]
    assert rows[0] == ["track_id", "score", "labeled"] and [r[0] for r in rows[1:]] == want


def test_bad_input_is_one_line_naming_it_and_writes_nothing(root, capsys):
    layout = Layout(root)
    before = storage.read_bytes(layout.catalog)
    cases = {
        ("seed", "nosuchtag"): "unknown tag 'nosuchtag'",
        ("similar", "t99999"): "track 't99999' is not in the catalog",
        ("seed", "brass", "--examples", "t00001,t00299"): "track 't00299' has no usable embedding",
        ("seed", "brass", "--confirm", "t00001,nope"): "track 'nope' is not in the catalog",
        ("seed", "a|b", "--confirm", "t00001"): "bad tag: 'a|b' contains",
        ("similar", "t00001", "--n", "0"): "--n must be at least 1, got 0",
    }
    for argv, message in cases.items():
        with pytest.raises(SystemExit) as exit_info:
            tags.main([*argv, "--root", root])
        assert message in str(exit_info.value) and "\n" not in str(exit_info.value)
    assert storage.read_bytes(layout.catalog) == before
    assert versions.latest_version(neighbors.index_uri(Layout(root), "synthetic")) is None


def test_confirmed_labels_reach_tune_and_tag(root, capsys):
    layout = Layout(root)
    cat = catalog.read(layout.catalog)
    unsplit = cat.set_column(4, "split", pa.array([None] + cat["split"].to_pylist()[1:], pa.string()))
    catalog.write(unsplit, layout.catalog)  # t00000 has no split: confirming puts it in train
    tags.main(["seed", "brass", "--examples", "t00001", "--confirm", "t00000,t00002,t00003", "--root", root])
    assert "labeled 4 track(s) 'brass'" in capsys.readouterr().out

    cat = catalog.read(layout.catalog)
    catalog.validate(cat)
    labels = dict(zip(cat["track_id"].to_pylist(), cat["tags"].to_pylist(), strict=True))
    assert all("brass" in labels[t] for t in ("t00000", "t00001", "t00002", "t00003"))
    assert cat["split"][0].as_py() == "train"
    _, emb = tagged_embeddings.make(n_tracks=300, n_errors=3, seed=1)
    data = fewshot.prepare(cat, emb, "synthetic")  # what tune fits probes on
    j = data.tags.index("brass")
    positives = {t for s in data.y for t, y in zip(data.track_ids[s], data.y[s][:, j], strict=True) if y}
    assert positives == {"t00000", "t00001", "t00002", "t00003"}
    human = tags.human_rows(cat, "now")  # what tag carries over as human labels
    brass = human.filter(pc.equal(human["tag"], "brass"))["track_id"].to_pylist()
    assert sorted(brass) == ["t00000", "t00001", "t00002", "t00003"]

    rows = cli(capsys, "seed", "brass", "--root", root, "--n", "3")  # the labeled tracks are the examples now
    assert not {r[0] for r in rows[1:]} & {"t00000", "t00001", "t00002", "t00003"}


def test_concurrent_confirmations_lose_nothing(root):
    """Eight writers label one shared track and one of their own at once: every label survives."""
    uri = Layout(root).catalog
    threads = [
        threading.Thread(target=catalog.add_labels, args=(uri, f"new{i}", ["t00005", f"t0002{i}"]))
        for i in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    labels = dict(zip(*catalog.read(uri, ["track_id", "tags"]).to_pydict().values(), strict=True))
    assert {f"new{i}" for i in range(8)} <= set(labels["t00005"])
    assert all(f"new{i}" in labels[f"t0002{i}"] for i in range(8))


def publish_probe_run(
    root: str, cat: pa.Table, emb: pa.Table, run_id: str, representation: str
) -> probes.ProbeSet:
    """A probe set of model ``synthetic`` reading ``representation``, published as a probe run."""
    config = {"budget": "all", "probe": "logreg", "representation": representation, "norm": "standardize"}
    probe_set = fewshot.final_probe_set(fewshot.prepare(cat, emb, "synthetic"), config)
    uri = storage.join(versions.version_uri(Layout(root).probes, run_id), "probe_set.safetensors")
    probe_set.save(uri)
    versions.publish(Layout(root).probes, run_id, [uri], [len(probe_set.tags)])
    return probe_set


def test_nearest_tracks_are_measured_where_the_latest_probe_run_looks(tmp_path, capsys):
    """Without a probe run: the learned embedding. With one chosen on fused: the embedding and the
    statistics side by side after its normalisation; the index is rebuilt for that space, and a probe run
    the embeddings cannot feed (no logmel column) is one line."""
    root = str(tmp_path)
    cat, emb = tagged_embeddings.write_root(root, n_tracks=300, n_errors=3, seed=1, logmel_dim=4)
    plain = index_job.main(["--root", root])
    assert plain.extra["representation"] == "embedding" and plain.extra["probe_run_id"] == ""

    probe_set = publish_probe_run(root, cat, emb, "tune-fused", "fused")
    found = neighbors.load(root)  # the index was built in another space: not used
    assert (
        isinstance(found.index, index.ExactIndex)
        and "fused, normalised as probe run tune-fused" in found.source
    )
    ok = emb.slice(0, 297)
    x = np.hstack([np.asarray(ok[c].to_pylist()) for c in ("embedding", "logmel")])
    z = (x - probe_set.norm.mean) / probe_set.norm.scale
    capsys.readouterr()  # the index job's summary
    rows = cli(capsys, "similar", "t00010", "--root", root, "--n", "5")
    sims, order = reference(z, z[[10]], 6)
    assert [r[0] for r in rows[1:]] == list(np.asarray(ok["track_id"].to_pylist())[order[0][1:]])
    np.testing.assert_allclose([float(r[1]) for r in rows[1:]], sims[0][1:], atol=1e-3)

    fused = index_job.main(["--root", root])
    assert fused.version != plain.version and fused.extra["representation"] == "fused"
    assert fused.extra["probe_run_id"] == "tune-fused" and fused.extra["dim"] == z.shape[1]
    assert neighbors.load(root).source.startswith("index ")

    embeddings_table.publish_table(Layout(root).embeddings, "synthetic", "v2", emb.drop_columns(["logmel"]))
    with pytest.raises(SystemExit, match="no logmel column") as exit_info:
        tags.main(["similar", "t00010", "--root", root])
    assert "\n" not in str(exit_info.value)
    with pytest.raises(ConfigError, match="'fused' needs"):
        index_job.main(["--root", root])
