"""The tag job: scores equal the probe applied directly, human labels survive, atomic, idempotent, S3;
``--only-new`` never mixes probe runs; empty embeddings fail before Ray. The table's own guarantees
without Ray are in ``test_tag_table.py``."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from conftest import LOGREG, SYNTHETIC_MODEL, free_port, publish_probe_set, write_synthetic_root
from pyiceberg.catalog.sql import SqlCatalog

from jobs import tag as tag_job
from musiclib import catalog
from musiclib.core import iceberg, storage, versions
from musiclib.core.config import ConfigError, Layout
from musiclib.datasets import demo, tagged_embeddings
from musiclib.embed import table as embeddings_table
from musiclib.probe import fewshot, probes
from musiclib.tag import tag_table, tags
from musiclib.tag.tag_table import Where


def check_table(root: str, cat, emb, probe_set: probes.ProbeSet, catalog_uri: str = "") -> None:
    """Model scores equal the probe applied directly; thresholds as saved; human labels unchanged."""
    iceberg = tag_table.require_table(Where(root, catalog_uri))
    table = tag_table.read(iceberg).to_pandas()
    ok = emb.filter(pc.is_null(emb["error"]))
    expected = probe_set.apply(embeddings_table.matrix(ok, probe_set.representation))
    model = table[table["source"] == "model"].set_index(["track_id", "tag"]).sort_index()
    assert len(model) == len(ok) * len(probe_set.tags)
    for i, tid in enumerate(ok["track_id"].to_pylist()[:40]):
        got = model.loc[tid].loc[probe_set.tags]
        np.testing.assert_allclose(got["score"].to_numpy(), expected[i], rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(got["predicted"].to_numpy(), expected[i] >= probe_set.thresholds)
    human = table[table["source"] == "human"]
    labels = {
        (t, g) for t, gs in zip(cat["track_id"].to_pylist(), cat["tags"].to_pylist(), strict=True) for g in gs
    }
    assert set(zip(human["track_id"], human["tag"], strict=True)) == labels and len(human) == len(labels)
    errors = tags.read_errors(iceberg)
    assert set(errors["track_id"].to_pylist()) == set(
        emb.filter(pc.is_valid(emb["error"]))["track_id"].to_pylist()
    )
    assert all(r.startswith("embedding error") for r in errors["reason"].to_pylist())


def first_run_checks(root: str, catalog_uri: str = "") -> tag_table.Run:
    """Tag a fresh root, check the table against the probe set, then check a re-run is a no-op."""
    cat, emb = write_synthetic_root(root, n_tracks=120)
    probe_set = publish_probe_set(root, cat, emb)
    catalog_args = ["--catalog-uri", catalog_uri] if catalog_uri else []
    first = tag_job.main(["--root", root, "--num-cpus", "2", *catalog_args])
    check_table(root, cat, emb, probe_set, catalog_uri)

    # a re-run with the same inputs is a no-op
    again = tag_job.main(["--root", root, *catalog_args])
    assert again == first
    runs = tag_table.runs(tag_table.require_table(Where(root, catalog_uri)))
    assert [r.run_id for r in runs] == [first.run_id]
    return first


def run_ids(root: str) -> list[str]:
    return [r.run_id for r in tag_table.runs(tag_table.require_table(Where(root)))]


def rows_of(root: str, run: tag_table.Run) -> pa.Table:
    """A run's rows (time travel to its snapshot), in a fixed order."""
    rows = tag_table.read(tag_table.require_table(Where(root)), snapshot_id=run.snapshot_id)
    return rows.sort_by([("source", "ascending"), ("track_id", "ascending"), ("tag", "ascending")])


@pytest.mark.slow
def test_tags_local(tmp_path, ray_local, capsys, monkeypatch):
    root = str(tmp_path / "root")
    layout = Layout(root)
    first = first_run_checks(root)
    assert re.search(r"^tag: (\d+)/\1 files \(100%\) .*\| tracks \d+", capsys.readouterr().out, re.M)

    # a crash after the data files, before the commit, leaves the previous snapshot current
    cat2, emb2 = tagged_embeddings.make(
        n_tracks=150, n_tags=8, dim=16, n_errors=3, seed=0, model_id=SYNTHETIC_MODEL
    )
    embeddings_table.publish_table(layout.embeddings, SYNTHETIC_MODEL, "v2", emb2)
    catalog.write(cat2, layout.catalog)

    def crash(*args, **kwargs):
        raise RuntimeError("killed before the commit")

    with monkeypatch.context() as patch:
        patch.setattr(tag_table, "commit", crash)
        with pytest.raises(RuntimeError, match="killed"):
            tag_job.main(["--root", root, "--only-new", "true"])
    assert run_ids(root) == [first.run_id]
    current = tag_table.current_run(tag_table.require_table(Where(root)))
    assert current == first and rows_of(root, current).equals(rows_of(root, first))

    # --only-new scores only the new tracks and keeps the others' files unchanged
    new = tag_job.main(["--root", root, "--only-new", "true"])
    assert run_ids(root) == [first.run_id, new.run_id] and new.parent_id == first.snapshot_id
    before = rows_of(root, first).to_pandas()
    after = rows_of(root, new).to_pandas()
    old_model = before[before["source"] == "model"].sort_values(["track_id", "tag"]).reset_index(drop=True)
    kept = after[(after["source"] == "model") & after["track_id"].isin(old_model["track_id"])]
    assert kept.sort_values(["track_id", "tag"]).reset_index(drop=True).equals(old_model)
    fresh = after[(after["source"] == "model") & ~after["track_id"].isin(old_model["track_id"])]
    # the new tracks, and the three whose embedding failed before and is fine now
    assert set(fresh["track_id"]) == {f"t{i:05d}" for i in range(117, 147)}
    assert len(fresh) == 30 * 8 and (fresh["probe_run_id"] == "tune-test").all()
    table = tag_table.require_table(Where(root))
    old_files = {
        f.file_path for f in tag_table.data_files(table, first.snapshot_id) if "/model/" in f.file_path
    }
    assert old_files < {f.file_path for f in tag_table.data_files(table)}  # kept, not rewritten

    summary = capsys.readouterr().out
    assert "tracks tagged by the model" in summary and "most confident new" in summary
    tags.main(["show", "t00001", "--root", root])
    tags.main(["top", "tag07", "--root", root, "--n", "3"])
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("track_id") and any("t00001" in line for line in out[1:])

    # a new probe run of the same model: --only-new keeps none of the older run's rows, and a crash
    # inside the catalog's commit (metadata written, the catalog not yet moved) is repaired by running
    # the same command again
    centroid = {"budget": "all", "probe": "centroid", "norm": "l2"}
    second = publish_probe_set(root, cat2, emb2, run_id="tune-test2", config=centroid)

    def crash_commit(*args, **kwargs):
        raise RuntimeError("killed inside the catalog commit")

    with monkeypatch.context() as patch:
        patch.setattr(SqlCatalog, "commit_table", crash_commit)
        with pytest.raises(RuntimeError, match="killed"):
            tag_job.main(["--root", root, "--only-new", "true"])
    assert run_ids(root) == [first.run_id, new.run_id]
    third = tag_job.main(["--root", root, "--only-new", "true"])
    assert run_ids(root) == [first.run_id, new.run_id, third.run_id]
    model = rows_of(root, third).filter(pc.field("source") == "model")
    assert set(model["probe_run_id"].to_pylist()) == {"tune-test2"}
    check_table(root, cat2, emb2, second)


@pytest.mark.slow
def test_tags_s3_with_a_postgresql_catalog(s3_root, postgres_catalog, postgres_server, ray_local, capsys):
    """An S3 root and a shared catalog in PostgreSQL: the job's table is registered in the database (where
    other machines and engines find it), ``tags sql`` reads it there, and the password is never printed."""
    root = s3_root + "/musiclib"
    first = first_run_checks(root, postgres_catalog)
    database = postgres_catalog.rpartition("/")[2]
    with postgres_server.connect(database) as conn:
        registered = conn.execute("SELECT table_namespace, table_name, metadata_location FROM iceberg_tables")
        registered = registered.fetchall()
    assert [r[:2] for r in registered] == [("musiclib", "tags")]
    assert registered[0][2].startswith(root + "/tags/warehouse/")  # the metadata on S3, found by the database
    query = "SELECT source, count(*) AS n FROM tags GROUP BY source ORDER BY source"
    tags.main(["sql", query, "--root", root, "--catalog-uri", postgres_catalog])
    tags.main(["history", "--root", root, "--catalog-uri", postgres_catalog])
    out = capsys.readouterr().out
    lines = out.splitlines()
    table = tag_table.read(tag_table.require_table(Where(root, postgres_catalog)))
    counts = table.group_by("source").aggregate([("source", "count")]).sort_by("source").to_pylist()
    sql_at = lines.index("source  n")
    assert lines[sql_at + 1 : sql_at + 1 + len(counts)] == [
        f"{c['source']}  {c['source_count']}" for c in counts
    ]
    assert first.run_id in lines[-1]
    assert postgres_server.password not in out and database in out  # the catalog is named, masked

    wrong = postgres_catalog.replace(postgres_server.password, "not-the-password")
    with pytest.raises(storage.StorageError, match="password authentication failed") as err:
        tag_table.open_table(Where(root, wrong))
    assert "not-the-password" not in str(err.value) and ":***@" in str(err.value)


FUSED = {**LOGREG, "representation": "fused"}


@pytest.mark.slow
def test_tags_of_a_fused_probe_set(tmp_path, ray_local):
    """The tag job on embeddings with log-mel statistics and a probe set chosen on fused: every score is
    the probe set applied to the embedding and the statistics side by side."""
    root = str(tmp_path / "root")
    cat, emb = write_synthetic_root(root, n_tracks=120, logmel_dim=6)
    probe_set = publish_probe_set(root, cat, emb, config=FUSED)
    assert probe_set.representation == "fused" and probe_set.weights.shape[0] == 16 + 6
    run = tag_job.main(["--root", root, "--num-cpus", "2"])
    check_table(root, cat, emb, probe_set)
    assert run.properties["representation"] == "fused"


def test_write_model_rows_scores_fused_rows_as_by_hand(tmp_path):
    """A block of the fused representation's columns: the scores are the embedding and the statistics side
    by side, normalised and multiplied by hand in float64."""
    cat, emb = tagged_embeddings.make(n_tracks=60, n_tags=5, dim=8, n_errors=3, seed=1, logmel_dim=4)
    probe_set = fewshot.final_probe_set(fewshot.prepare(cat, emb, "synthetic"), FUSED)
    block = emb.select(embeddings_table.columns("fused"))
    written = tags.write_model_rows(block, probe_set, "tune-x", "2026-11-23T00:00:00", str(tmp_path))
    fs, path = storage.arrow_filesystem(written["file"][0].as_py())
    rows = pq.read_table(path, filesystem=fs)
    ok = emb.filter(pc.is_null(emb["error"]))
    x = np.hstack([np.array(ok[c].to_pylist(), np.float64) for c in ("embedding", "logmel")])
    z = (x - probe_set.norm.mean) / probe_set.norm.scale
    expected = 1 / (1 + np.exp(-(z @ probe_set.weights.astype(np.float64) + probe_set.biases)))
    assert rows["track_id"].to_pylist() == ok["track_id"].to_pylist() * 5  # by tag, then track
    by_tag = expected[:, np.argsort(probe_set.tags)]  # row groups in tag order
    np.testing.assert_allclose(rows["score"].to_numpy().reshape(5, -1).T, by_tag, rtol=1e-5, atol=1e-6)


def test_a_fused_probe_set_on_embeddings_without_logmel_fails_before_ray(tmp_path, monkeypatch):
    """Embeddings written before the embed job computed the statistics cannot feed a fused probe set: one
    line says so, and nothing is written."""
    root = str(tmp_path / "root")
    cat, emb = write_synthetic_root(root, n_tracks=80, logmel_dim=6)
    publish_probe_set(root, cat, emb, config=FUSED)
    embeddings_table.publish_table(
        Layout(root).embeddings, SYNTHETIC_MODEL, "v2", emb.drop_columns(["logmel"])
    )

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray started")

    monkeypatch.setattr(tag_job, "ray_session", no_ray)
    with pytest.raises(ConfigError, match="version v2\\) have no logmel column") as err:
        tag_job.main(["--root", root])
    assert "'fused' needs" in str(err.value) and "\n" not in str(err.value)
    assert tag_table.open_table(Where(root)) is None


def test_write_model_rows_scores_one_block_into_one_file(tmp_path):
    """One block: its tracks without errors, less those the scored-tracks file lists, scored as the probe
    set applied directly, one row group per tag in tag order, with the counts the summary adds up; the
    same block again rewrites the same file."""
    cat, emb = tagged_embeddings.make(
        n_tracks=60, n_tags=5, dim=8, n_errors=3, seed=1, model_id=SYNTHETIC_MODEL
    )
    probe_set = fewshot.final_probe_set(fewshot.prepare(cat, emb, SYNTHETIC_MODEL), LOGREG)
    block = emb.select(["track_id", "embedding", "error"])
    ok = block.filter(pc.is_null(block["error"]))
    skip = str(tmp_path / "scored.parquet")
    storage.write_parquet(pa.table({"track_id": ok["track_id"].to_pylist()[:4] + ["other"]}), skip)
    folder = str(tmp_path / "model")
    args = (probe_set, "tune-x", "2026-11-23T00:00:00", folder)
    written = tags.write_model_rows(block, *args, skip=skip, batch_size=10)
    ids = ok["track_id"].to_pylist()[4:]
    assert written.schema == tags.WRITTEN and written["tracks"].to_pylist() == [len(ids)]
    uri = written["file"][0].as_py()
    assert storage.list_files(folder, ".parquet") == [uri]
    fs, path = storage.arrow_filesystem(uri)
    assert pq.read_metadata(path, filesystem=fs).num_row_groups == len(probe_set.tags)
    rows = pq.read_table(path, filesystem=fs)
    assert rows.schema == tags.SCHEMA and len(rows) == len(ids) * len(probe_set.tags)
    assert probe_set.link == "sigmoid" and not (probe_set.norm.pre_l2 or probe_set.norm.post_l2)
    x = np.array(ok["embedding"].to_pylist()[4:], np.float64)
    z = (x - probe_set.norm.mean) / probe_set.norm.scale  # standardised, as fitted
    expected = 1 / (1 + np.exp(-(z @ probe_set.weights.astype(np.float64) + probe_set.biases)))
    order = np.argsort(probe_set.tags)
    assert rows["tag"].to_pylist() == list(np.repeat(np.array(probe_set.tags)[order], len(ids)))
    assert rows["tag"].to_pylist() == sorted(rows["tag"].to_pylist())  # the table's sort order
    assert rows["track_id"].to_pylist() == ids * len(probe_set.tags)
    scores = rows["score"].to_numpy().reshape(len(probe_set.tags), -1).T  # tracks x tags, in tag order
    np.testing.assert_allclose(scores, expected[:, order], rtol=1e-5, atol=1e-6)
    predicted = rows["predicted"].to_numpy(zero_copy_only=False).reshape(len(probe_set.tags), -1).T
    np.testing.assert_array_equal(predicted, scores >= probe_set.thresholds[order])
    assert written["predicted"].to_pylist() == [predicted.sum(axis=0)[np.argsort(order)].tolist()]
    assert written["untagged"].to_pylist() == [int((~predicted.any(axis=1)).sum())]
    for column, value in (("source", "model"), ("model_id", SYNTHETIC_MODEL), ("probe_run_id", "tune-x")):
        assert set(rows[column].to_pylist()) == {value}
    assert rows["reason"].null_count == len(rows)

    again = tags.write_model_rows(block, *args, skip=skip, batch_size=7)  # a retried task: the same file
    assert again["file"].to_pylist() == [uri] and storage.list_files(folder, ".parquet") == [uri]
    assert len(tags.write_model_rows(block.filter(pc.is_valid(block["error"])), *args)) == 0
    assert storage.list_files(folder, ".parquet") == [uri]


def test_the_scoring_side_loads_without_torch():
    """The tag job's tasks import ``musiclib.tag.tags`` and load a probe set, and every later stage reads the
    embeddings table (``musiclib.embed.table``): none may pull in torch or scikit-learn (hundreds of MiB in
    every worker), which only fitting and embedding need."""
    modules = "musiclib.tag.tags, musiclib.probe.probes, musiclib.embed.table"
    code = f"import sys, {modules}; print(sorted({{'torch', 'sklearn'}} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_empty_embeddings_fail_before_ray(tmp_path, monkeypatch):
    root = str(tmp_path / "root")
    layout = Layout(root)
    cat, emb = write_synthetic_root(root, n_tracks=80)
    publish_probe_set(root, cat, emb)

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray started")

    monkeypatch.setattr(tag_job, "ray_session", no_ray)
    dataset = embeddings_table.dataset_uri(layout.embeddings, SYNTHETIC_MODEL)
    embeddings_table.publish_table(
        layout.embeddings, SYNTHETIC_MODEL, "v2", emb.slice(0, 0)
    )  # one file, no rows
    versions.publish(dataset, "v3", [], [], move_latest=False)  # no file at all
    for version in ("v2", "v3"):
        versions.set_latest(dataset, version)
        with pytest.raises(
            ConfigError, match=f"the embeddings of {SYNTHETIC_MODEL} hold no rows: version {version}"
        ) as err:
            tag_job.main(["--root", root])
        assert "run embed on a non-empty catalog" in str(err.value) and "\n" not in str(err.value)
    assert tag_table.open_table(Where(root)) is None


def test_missing_catalog_or_probe_set_fails_before_ray(tmp_path):
    with pytest.raises(ConfigError, match="catalog not found"):
        tag_job.main(["--root", str(tmp_path)])
    demo.make_catalog(str(tmp_path), n_tracks=2, min_seconds=3.0, max_seconds=3.0, workers=1)
    with pytest.raises(ConfigError, match="run tune first"):
        tag_job.main(["--root", str(tmp_path)])
    with pytest.raises(ConfigError):
        tag_job.main(["--root", str(tmp_path), "--batch-size", "0"])
    bad = ["--catalog-uri", "nonsense", "--table", "tags", "--batch-size", "0"]
    with pytest.raises(ConfigError) as err:
        tag_job.main(["--root", str(tmp_path), *bad])
    assert "--catalog-uri must be" in str(err.value) and "got 'nonsense'" in str(err.value)
    assert "--table must be <namespace>.<name>, got 'tags'" in str(err.value) and "--batch-size" in str(
        err.value
    )
    with pytest.raises(ConfigError, match="got a value with '@'") as err:
        tag_job.main(["--root", str(tmp_path), "--catalog-uri", "user:secret@host"])
    assert "secret" not in str(err.value)
    assert not (tmp_path / "tags" / "iceberg.db").exists()  # no table made for a run that could not start


def test_a_postgresql_catalog_uri_is_checked_and_its_password_never_shown(tmp_path):
    """``postgresql://`` goes through psycopg 3; a URI whose driver is missing, or whose database does not
    answer, is one line with the password masked."""
    uri = "postgresql://tagger:hunter2@db.internal:5432/iceberg"
    assert iceberg.catalog_problem(uri) is None
    assert iceberg.sql_url(uri).drivername == "postgresql+psycopg"
    assert iceberg.masked(uri) == "postgresql://tagger:***@db.internal:5432/iceberg"
    problem = iceberg.catalog_problem("mysql://tagger:hunter2@db.internal/iceberg")
    assert "needs the Python module MySQLdb" in problem and "hunter2" not in problem
    closed = f"postgresql://tagger:hunter2@127.0.0.1:{free_port()}/iceberg"
    with pytest.raises(
        storage.StorageError, match="cannot open the Iceberg catalog postgresql://tagger:\\*\\*\\*@"
    ):
        iceberg.open_catalog(closed, str(tmp_path), str(tmp_path / "warehouse"), create=True)


def test_an_s3_root_without_a_shared_catalog_is_refused(tmp_path, capsys):
    """An S3 root with no catalog named would keep its table in a SQLite file on the driver's disk (lost
    with a KubeRay head pod, unseen by Trino): the job and the query tool refuse it before any storage
    or Ray; an explicit SQLite URI is a deliberate single-machine choice and passes validation."""
    with pytest.raises(ConfigError) as err:
        tag_job.main(["--root", "s3://no-such-bucket/catalog"])
    message = str(err.value)
    assert "needs a shared Iceberg catalog" in message and "--catalog-uri postgresql://" in message
    assert "MUSICLIB_TAG_CATALOG" in message and "glue" in message
    with pytest.raises(SystemExit, match="needs a shared Iceberg catalog"):
        tags.main(["top", "drums", "--root", "s3://no-such-bucket/catalog"])
    with pytest.raises(storage.StorageError, match="needs a shared Iceberg catalog"):
        tag_table.open_table(Where("s3://no-such-bucket/catalog"))
    explicit = f"sqlite:///{tmp_path}/iceberg.db"
    cfg = tags.TagConfig(root="s3://no-such-bucket/catalog", catalog_uri=explicit)
    cfg.validate()
    assert cfg.where.resolved_catalog() == explicit
    assert Where(str(tmp_path)).resolved_catalog() == f"sqlite:///{tmp_path}/tags/iceberg.db"


def test_top_and_the_counts_match_a_full_read(tmp_path, capsys):
    """``top`` (one tag's rows, streamed) and the counts the scoring tasks return equal what a full read of
    the snapshot gives, on files by tag and on a file of the older track-major layout; ``--only-new`` keeps
    a snapshot's model files only when it recorded its counts."""
    cat, emb = tagged_embeddings.make(n_tracks=60, n_tags=5, dim=8, seed=1, model_id=SYNTHETIC_MODEL)
    probe_set = fewshot.final_probe_set(fewshot.prepare(cat, emb, SYNTHETIC_MODEL), LOGREG)
    iceberg = tag_table.open_table(Where(str(tmp_path / "root")), create_with=tags.SCHEMA)
    assert [iceberg.schema().find_column_name(f.source_id) for f in iceberg.sort_order().fields] == ["tag"]
    folder = storage.join(tag_table.run_dir(iceberg, "r1"), "model")
    block = emb.select(["track_id", "embedding", "error"])
    args = (probe_set, "tune-x", "2026-11-23T00:00:00", folder)
    written = [tags.write_model_rows(block.slice(i, 20), *args).to_pylist()[0] for i in (0, 20, 40)]
    old = written[2]["file"].replace(
        "model-", "old-"
    )  # the same rows, track-major, as the job wrote them before
    storage.write_parquet(storage.read_parquet([written[2]["file"]]).sort_by("track_id"), old)
    human = storage.join(tag_table.run_dir(iceberg, "r1"), "human.parquet")
    storage.write_parquet(tags.human_rows(cat, "2026-11-23T00:00:00"), human)
    files = [w["file"] for w in written[:2]] + [old, human]
    run = tag_table.commit(iceberg, "r1", files, {"model-id": SYNTHETIC_MODEL, "probe-run-id": "tune-x"})

    rows = tag_table.read(iceberg).to_pandas()
    model, labeled = rows[rows["source"] == "model"], rows[rows["source"] == "human"]
    for tag in probe_set.tags:
        mine = model[model["tag"] == tag].sort_values(["score", "track_id"], ascending=[False, True])
        humans = set(labeled[labeled["tag"] == tag]["track_id"])
        new = mine[mine["predicted"] & ~mine["track_id"].isin(humans)]
        for n, got, want in (
            (7, tags.top(iceberg, tag, 7), mine),
            (4, tags.top(iceberg, tag, 4, new=True), new),
        ):
            assert got["track_id"].to_pylist() == want["track_id"].head(n).tolist()
            np.testing.assert_array_equal(got["score"].to_numpy(), want["score"].head(n).to_numpy())
            assert got["human_label"].to_pylist() == [t in humans for t in got["track_id"].to_pylist()]
    assert tags.top(iceberg, probe_set.tags[0], 4, new=True)["human_label"].to_pylist() == [False] * 4

    counts = tags.ModelCounts.of_written(written, probe_set.tags)
    per_track = model.groupby("track_id")["predicted"].sum()
    assert counts.tracks == model["track_id"].nunique() == 60 and counts.untagged == int(
        (per_track == 0).sum()
    )
    assert (
        counts.predicted == model[model["predicted"]].groupby("tag").size().reindex(probe_set.tags).to_dict()
    )
    assert (counts + counts).predicted == {t: 2 * c for t, c in counts.predicted.items()}

    # --only-new: a snapshot without counts (written before them) keeps nothing; with them, its model files
    assert tags.carried_files(iceberg, SYNTHETIC_MODEL, "tune-x") == (frozenset(), tags.ModelCounts())
    assert "scores every track again" in capsys.readouterr().out
    properties = {"model-id": SYNTHETIC_MODEL, "probe-run-id": "tune-x", tags.COUNTS: counts.to_json()}
    tag_table.commit(iceberg, "r2", [], properties, keep=frozenset(files))
    keep, carried = tags.carried_files(iceberg, SYNTHETIC_MODEL, "tune-x")
    assert keep == frozenset(files[:3]) and carried == counts
    assert tags.carried_files(iceberg, SYNTHETIC_MODEL, "tune-y") == (frozenset(), tags.ModelCounts())
    assert run.snapshot_id in {r.snapshot_id for r in tag_table.runs(iceberg)}
