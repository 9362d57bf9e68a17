"""Pretraining pieces without Ray (config, shards, labels, batches, gather, checkpoints) and a short Ray run."""

from __future__ import annotations

import io
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import free_port

from jobs import pretrain as job
from musiclib import audio, catalog
from musiclib.core import storage, versions
from musiclib.core.config import ConfigError, Layout, parse
from musiclib.train.data import TrainingData, compose_batch, load_training_data, sample_batch
from musiclib.train.labels import (
    LabelPlan,
    describe_labels,
    label_facts,
    plan_labels,
    positive_share,
    select_labels,
)
from musiclib.train.pretraining import (
    PretrainConfig,
    ProjectionQueue,
    build,
    check_resume,
    checkpoint_state,
    fit,
    global_loss,
    learning_rate,
    load_checkpoint,
    restore,
    resume_conflicts,
    save_checkpoint,
)
from musiclib.train.shards import (
    committed_shards,
    plan_shards,
    prepare_shard,
    read_shard_columns,
    shard_report,
)

SR = audio.SAMPLE_RATE
CHUNK = audio.CHUNK_SAMPLES


def write_wav(path: Path, x: np.ndarray, sr: int = 44100) -> None:
    """A mono 16-bit WAV written with PyAV."""
    import av

    with av.open(str(path), "w", format="wav") as out:
        stream = out.add_stream("pcm_s16le", rate=sr, layout="mono")
        frame = av.AudioFrame.from_ndarray(audio.to_int16(x)[None, :], format="s16", layout="mono")
        frame.sample_rate = sr
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            out.mux(packet)


@pytest.fixture
def tiny_catalog(tmp_path: Path, sine) -> str:
    """Six train tracks (one 40 s long, one missing, one silent) and a test-split track."""
    folder = tmp_path / "catalog"
    (folder / "audio").mkdir(parents=True)
    rows = []
    for i, (seconds, tags) in enumerate([(7, ["rock"]), (8, ["rock", "calm"]), (7, []), (40, ["jazz"])]):
        write_wav(folder / "audio" / f"t{i}.wav", sine(220.0 * (i + 1), seconds))
        rows.append((f"t{i}", f"audio/t{i}.wav", tags, "train"))
    write_wav(folder / "audio" / "silent.wav", np.zeros(7 * 44100, np.float32))
    rows += [("gone", "audio/gone.wav", [], "train"), ("quiet", "audio/silent.wav", ["calm"], "train")]
    rows.append(("held", "audio/t0.wav", ["rock"], "test"))
    table = pa.table(
        {k: [r[i] for r in rows] for i, k in enumerate(["track_id", "audio_uri", "tags", "split"])}
    )
    uri = str(folder / "tracks.parquet")
    catalog.write(table, uri)
    return uri


# --------------------------------------------------------------------------- config


def test_config_rejects_bad_values_with_clear_messages():
    argv = "--batch-size 7 --num-workers 2 --b-s 1.5 --views pairs --precision fp16".split()
    with pytest.raises(ConfigError) as err:
        parse(PretrainConfig, argv)
    message = str(err.value)
    assert "--batch-size 7" in message and "--b-s 1.5" in message and "--views 'pairs'" in message
    assert "--precision 'fp16'" in message
    with pytest.raises(ConfigError, match="p_noise"):
        parse(PretrainConfig, ["--p-noise", "2"])
    with pytest.raises(ConfigError, match="--idf .* needs --weighted true"):
        parse(PretrainConfig, ["--idf", "true"])
    cfg = parse(PretrainConfig, ["--gain-db", "-6,3", "--width", "0.25"])
    assert cfg.augment_config().gain_db == (-6.0, 3.0) and cfg.encoder_config().width == 0.25


def test_an_elastic_run_needs_a_batch_every_worker_count_divides():
    """With ``--min-workers`` the run may go on with any count down to it: each must split the batch."""
    with pytest.raises(ConfigError, match=r"worker count the run may have \(2, 3, 4\).*smallest that is: 12"):
        parse(PretrainConfig, "--num-workers 4 --min-workers 2 --batch-size 32".split())
    for bad in ("3", "-1"):
        with pytest.raises(ConfigError, match=f"--min-workers {bad} must be in"):
            parse(PretrainConfig, f"--num-workers 2 --min-workers {bad}".split())
    elastic = parse(PretrainConfig, "--num-workers 4 --min-workers 2 --batch-size 24".split())
    assert list(elastic.world_sizes()) == [2, 3, 4]
    assert list(parse(PretrainConfig, "--num-workers 4 --batch-size 8".split()).world_sizes()) == [4]


def test_learning_rate_warmup_and_cosine():
    cfg = PretrainConfig(steps=100, warmup=10, cosine=True, lr=1e-3)
    assert learning_rate(0, cfg) == pytest.approx(1e-4)
    assert learning_rate(9, cfg) == pytest.approx(1e-3)
    assert learning_rate(55, cfg) == pytest.approx(5e-4)
    assert learning_rate(100, cfg) == pytest.approx(0.0, abs=1e-12)
    assert learning_rate(50, PretrainConfig(steps=100)) == 1e-4


# --------------------------------------------------------------------------- shards


def test_prepare_shards_records_bad_tracks_caps_long_ones_and_resumes(tiny_catalog, tmp_path):
    shards = str(tmp_path / "shards")
    table = catalog.read(tiny_catalog)
    train = table.filter(pa.compute.equal(table.column("split"), "train"))
    base = catalog.base_dir(tiny_catalog)
    groups = plan_shards(train, set(), shard_tracks=4)
    assert [len(g["track_id"]) for g in groups] == [4, 2]
    prepare_shard(groups[0], shards, base, max_seconds=20.0, segment_seconds=10.0)
    # a re-run skips the tracks of the committed shard; an uncommitted leftover file is ignored
    storage.write_bytes(str(tmp_path / "shards" / "part-leftover" / "shard.parquet"), b"partial")
    done = set(read_shard_columns(committed_shards(shards), ["track_id"]).column("track_id").to_pylist())
    remaining = plan_shards(train, done, shard_tracks=4)
    assert [g["track_id"] for g in remaining] == [["gone", "quiet"]]
    prepare_shard(remaining[0], shards, base, max_seconds=20.0, segment_seconds=10.0)
    report = shard_report(committed_shards(shards))
    assert report == {"shards": 2, "tracks": 6, "usable": 4, "bad": {"missing": 1, "silent": 1}}
    rows = read_shard_columns(committed_shards(shards), ["track_id", "audio", "segment_samples"]).to_pylist()
    by_id = {r["track_id"]: r for r in rows}
    assert by_id["t3"]["segment_samples"] == 10 * SR  # 40 s track: two evenly spread 10 s segments
    assert len(by_id["t3"]["audio"]) == 2 * 2 * 10 * SR
    assert by_id["t0"]["segment_samples"] == 7 * SR and len(by_id["t0"]["audio"]) == 2 * 7 * SR


# --------------------------------------------------------------------------- labels and batches


def test_select_labels_uses_exactly_p_s_of_labeled_tracks_nested():
    ids = [f"t{i}" for i in range(200)]
    tags = [["a"] if i % 2 else [] for i in range(200)]
    half = select_labels(ids, tags, p_s=0.5, seed=1)
    quarter = select_labels(ids, tags, p_s=0.25, seed=1)
    assert sum(bool(g) for g in half.values()) == 50
    assert sum(bool(g) for g in quarter.values()) == 25
    assert {t for t, g in quarter.items() if g} <= {t for t, g in half.items() if g}
    assert not any(select_labels(ids, tags, p_s=0.0, seed=1).values())


def test_positive_share_is_the_mean_target_over_distinct_labeled_pairs():
    rng = np.random.default_rng(3)
    vocabulary = [f"g{i}" for i in range(6)]
    kept = {
        f"t{i}": sorted({vocabulary[j] for j in rng.integers(0, 6, rng.integers(1, 5))}) for i in range(30)
    }
    kept |= {"u0": [], "u1": []}  # unlabeled tracks are not pairs of labeled tracks
    plan = LabelPlan(kept, vocabulary, labeled_in_catalog=30)
    sets = [set(tags) for tags in kept.values() if tags]
    pairs = [(a, b) for i, a in enumerate(sets) for j, b in enumerate(sets) if i != j]
    for threshold in (1, 2):
        expected = np.mean([float(len(a & b) >= threshold) for a, b in pairs], dtype=np.float64)
        assert positive_share(plan, threshold, weighted=False) == pytest.approx(expected, rel=1e-12)
    dice = np.mean([2 * len(a & b) / (len(a) + len(b)) for a, b in pairs], dtype=np.float64)
    assert positive_share(plan, 1, weighted=True) == pytest.approx(dice, rel=1e-12)
    labeled = [tags for tags in kept.values() if tags]
    idf = {g: np.log(len(labeled) / sum(g in tags for tags in labeled)) for g in vocabulary}
    assert plan.tag_weights(idf=True) == pytest.approx([idf[g] for g in vocabulary], rel=1e-12)
    weighted = np.mean(
        [2 * sum(idf[g] for g in a & b) / (sum(idf[g] for g in a) + sum(idf[g] for g in b)) for a, b in pairs]
    )
    assert positive_share(plan, 1, weighted=True, idf=True) == pytest.approx(weighted, rel=1e-12)
    assert positive_share(LabelPlan({"a": ["g0"], "b": []}, ["g0"], 1), 1, False) is None
    dense = LabelPlan({f"t{i}": ["g0", f"g{i % 5 + 1}"] for i in range(10)}, vocabulary, 10)
    facts = label_facts(dense, PretrainConfig(root="x", label_threshold=1))
    assert facts["mean_label_target"] == 1.0 and "most labeled pairs are positives" in describe_labels(facts)
    facts = label_facts(dense, PretrainConfig(root="x", label_threshold=2))
    assert "most labeled pairs" not in describe_labels(facts) and "--label-threshold 2" in describe_labels(
        facts
    )


def test_null_and_empty_tags_are_dropped_never_stringified(tiny_catalog, tmp_path):
    shards = str(tmp_path / "shards")
    group = {
        "track_id": ["a", "b", "c"],
        "audio_uri": ["audio/t0.wav", "audio/t1.wav", "audio/t2.wav"],
        "tags": [[None, "", "rock"], np.array([None], dtype=object), None],  # Ray Data may hand arrays
    }
    prepare_shard(group, shards, catalog.base_dir(tiny_catalog), 20.0, 10.0)
    uris = committed_shards(shards)
    assert read_shard_columns(uris, ["tags"]).column("tags").to_pylist() == [["rock"], [], []]
    plan = plan_labels(uris, p_s=1.0, seed=0)
    assert plan.vocabulary == ["rock"] and plan.labeled_in_catalog == 1


def fake_data(n_labeled: int, n_unlabeled: int, seconds: float = 6.0) -> TrainingData:
    """Tracks whose samples count up (sample value = index mod 2^15), so views reveal where they came from."""
    n = n_labeled + n_unlabeled
    length = int(seconds * SR)
    samples = (np.arange(n * length) % 32768).astype(np.int16)
    labels = np.zeros((n, 3), np.float32)
    labels[:n_labeled, 0] = 1.0
    return TrainingData(samples, np.arange(n + 1) * length, np.full(n, length), labels)


def test_batch_composition_honours_b_s():
    data = fake_data(40, 60)
    rng = np.random.default_rng(0)
    for b_s, n_lab in [(0.5, 8), (0.25, 4), (0.0, 0), (1.0, 16)]:
        idx, labeled = compose_batch(data, 16, b_s, rng)
        assert len(idx) == 16 and len(set(idx.tolist())) == 16 and labeled == n_lab
        assert (data.labels[idx[:n_lab], 0] > 0).all() and (data.labels[idx[n_lab:]] == 0).all()
    only_unlabeled = fake_data(0, 10)
    idx, labeled = compose_batch(only_unlabeled, 8, 0.5, rng)
    assert labeled == 0 and (only_unlabeled.labels[idx] == 0).all()


def test_an_all_labeled_catalog_keeps_the_unlabeled_share_with_labels_hidden():
    """p_s = 1 on a catalog where every track is labeled: b_s still sets the mix, so SemiSupCon with all
    labels (b_s 0.5) and supervised-only training (b_s 1) see different batches."""
    data = fake_data(20, 0)
    rng = np.random.default_rng(0)
    idx, labeled = compose_batch(data, 16, 0.5, rng)
    assert labeled == 8 and len(idx) == 16
    batch = sample_batch(data, 16, 0.5, "adjacent", rng)
    assert batch.labels[:8, 0].eq(1).all() and batch.labels[8:].eq(0).all()
    assert data.labels.sum() == 20  # hiding labels in a batch leaves the training data as it was
    supervised = sample_batch(data, 16, 1.0, "adjacent", rng)
    assert supervised.labels[:, 0].eq(1).all()


def test_plan_and_load_training_data_split_across_workers(tiny_catalog, tmp_path):
    shards = str(tmp_path / "shards")
    table = catalog.read(tiny_catalog)
    train = table.filter(pa.compute.equal(table.column("split"), "train"))
    for group in plan_shards(train, set(), shard_tracks=2):
        prepare_shard(group, shards, catalog.base_dir(tiny_catalog), 20.0, 10.0)
    uris = committed_shards(shards)
    plan = plan_labels(uris, p_s=1.0, seed=0)
    assert plan.vocabulary == ["calm", "jazz", "rock"] and plan.labeled_in_catalog == 3 == plan.labeled_used
    parts = [load_training_data(uris, plan, rank, 2) for rank in range(2)]
    assert sum(len(p) for p in parts) == 4  # the usable tracks, each on exactly one worker
    assert sum(int(p.labels.sum()) for p in parts) == 4  # rock, rock+calm, jazz
    assert plan_labels(uris, p_s=0.0, seed=0).labeled_used == 0


@pytest.mark.parametrize("mode", ["adjacent", "crops"])
def test_views_are_cut_from_one_track(mode):
    data = fake_data(2, 2)
    batch = sample_batch(data, 4, 0.5, mode, np.random.default_rng(0))
    assert batch.views.shape == (8, CHUNK) and batch.labels.shape == (4, 3)
    first = torch.round(batch.views[:4, 0] * 32767).long()
    second = torch.round(batch.views[4:, 0] * 32767).long()
    if mode == "adjacent":
        assert torch.all((second - first) % 32768 == CHUNK % 32768)
    steps = torch.round(batch.views[:, 1:] * 32767).long() - torch.round(batch.views[:, :-1] * 32767).long()
    assert torch.all((steps % 32768) == 1)  # each view is one contiguous slice


# --------------------------------------------------------------------------- gather across workers


def _gather_setup(encoder: str, world: int) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """A float64 model and a batch of 6 clips (12 views) with some labels, identical in every process.

    ``mlp``: a small MLP. ``sync-bn`` / ``plain-bn``: the real encoder and head (SampleCNN at width 1/16,
    with BatchNorm) as ``build`` makes them for ``world`` workers, with and without ``--sync-bn``.
    """
    labels = torch.tensor([[1, 0], [1, 1], [0, 0], [0, 1], [0, 0], [1, 0]], dtype=torch.float64)
    if encoder == "mlp":
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4)).double()
        return model, torch.randn(2, 6, 5, dtype=torch.float64), labels  # [view, clip, feature]
    melcnn = {"encoder": "melcnn", "n_mels": 32, "hop": 1024}
    family = melcnn if encoder.startswith("melcnn") else {"encoder": "samplecnn"}
    cfg = PretrainConfig(
        width=0.0625, num_workers=world, batch_size=6, sync_bn=encoder.endswith("sync-bn"), **family
    )
    model = build(cfg, torch.device("cpu"))[0].double()  # build seeds torch: the same weights and input
    return model, 0.1 * torch.randn(2, 6, CHUNK, dtype=torch.float64), labels


def _gather_worker(rank: int, world: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    results = {}
    for encoder in ("mlp", "sync-bn", "plain-bn", "melcnn-sync-bn"):
        model, x, labels = _gather_setup(encoder, world)
        n = x.shape[1] // world
        local = slice(rank * n, (rank + 1) * n)
        loss, _, _ = global_loss(model(x[:, local].reshape(2 * n, -1)), labels[local], 0.1, 1, False)
        loss.backward()
        dist.all_reduce(loss.detach())
        grads = [p.grad for p in model.parameters()]
        for g in grads:  # what DDP does: average the workers' gradients
            dist.all_reduce(g)
        running = {k: v for k, v in model.state_dict().items() if k.endswith(("running_mean", "running_var"))}
        results[encoder] = {
            "loss": loss.detach() / world,
            "grads": [g / world for g in grads],
            "running": running,
        }
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory) -> dict[str, dict]:
    """Loss, averaged gradients and running statistics of each ``_gather_setup`` model from two gloo
    processes, each on half the batch (one spawn for all: starting the processes costs most)."""
    out = str(tmp_path_factory.mktemp("gather") / "two_workers.pt")
    mp.spawn(_gather_worker, args=(2, free_port(), out), nprocs=2, join=True)
    return torch.load(out, weights_only=True)


def _one_worker(encoder: str) -> tuple[torch.nn.Module, torch.Tensor]:
    """The same model on the whole batch in one process: the model after backward, and the loss."""
    model, x, labels = _gather_setup(encoder, 1)
    loss, _, _ = global_loss(model(x.reshape(12, -1)), labels, 0.1, 1, False)
    loss.backward()
    return model, loss.detach()


@pytest.mark.slow
@pytest.mark.parametrize("encoder", ["mlp", "sync-bn", "melcnn-sync-bn"])
def test_global_gather_matches_one_worker_on_the_whole_batch(two_workers, encoder):
    two = two_workers[encoder]
    model, loss = _one_worker(encoder)
    torch.testing.assert_close(two["loss"], loss)
    for got, param in zip(two["grads"], model.parameters(), strict=True):
        torch.testing.assert_close(got, param.grad)
    state = model.state_dict()
    # SampleCNN: 11 BatchNorm layers; the log-mel CNN: one per band, then four
    assert len(two["running"]) == {"mlp": 0, "sync-bn": 22, "melcnn-sync-bn": 10}[encoder]
    for name, value in two["running"].items():
        torch.testing.assert_close(value, state[name])


@pytest.mark.slow
def test_without_sync_bn_two_workers_differ_from_one_worker(two_workers):
    two = two_workers["plain-bn"]
    model, loss = _one_worker("plain-bn")
    assert not torch.allclose(two["loss"], loss, rtol=1e-3)
    assert not all(
        torch.allclose(got, param.grad, rtol=1e-3) for got, param in zip(two["grads"], model.parameters())
    )


# --------------------------------------------------------------------------- checkpoints and the loop


def test_checkpoint_round_trip_is_weights_only(tmp_path):
    cfg = PretrainConfig(width=0.0625, steps=2, batch_size=4, p_pitch=0.0, log_every=1, checkpoint_every=2)
    model, optimizer, augment = build(cfg, torch.device("cpu"))
    seen = []
    fit(model, optimizer, augment, fake_data(4, 4), cfg, torch.device("cpu"), 0, lambda *a: seen.append(a))
    assert [(s, due) for s, _, due in seen] == [(1, False), (2, True)]
    assert np.isfinite(seen[-1][1]["loss"]) and 0.0 <= seen[-1][1]["data_wait"] < 1.0
    save_checkpoint(checkpoint_state(model, optimizer, 2, cfg), str(tmp_path))
    state = torch.load(io.BytesIO((tmp_path / "state.pt").read_bytes()), weights_only=True)
    assert state["step"] == 2 and state["config"]["width"] == 0.0625 and state["code_version"]
    fresh, fresh_opt, _ = build(PretrainConfig(width=0.0625, seed=1), torch.device("cpu"))
    assert restore(fresh, fresh_opt, load_checkpoint(str(tmp_path))) == (2, 0.0)
    for a, b in zip(fresh.state_dict().values(), model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)


def test_a_time_budget_ends_training_at_a_checkpoint_and_spans_resumes():
    """With ``--minutes``, training stops once its step time reaches the budget (counted from the seconds a
    resumed run has already trained), at a step that is reported as the last checkpoint; the cosine
    schedule decays over whichever ends first, the steps or the budget."""
    cfg = PretrainConfig(width=0.0625, steps=1000, minutes=0.5, batch_size=4, p_pitch=0.0, log_every=100)
    seen = []
    model, optimizer, augment = build(cfg, torch.device("cpu"))
    data = fake_data(4, 4)
    fit(model, optimizer, augment, data, cfg, torch.device("cpu"), 7, lambda *a: seen.append(a), 29.9)
    (step, metrics, due), *_ = seen
    assert len(seen) == 1 and due and 8 <= step < 1000 and metrics["trained_s"] >= 30.0
    before = [p.detach().clone() for p in model.parameters()]
    assert fit(model, optimizer, augment, data, cfg, torch.device("cpu"), step, None, 30.0) == {}
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))  # not one step
    cosine = PretrainConfig(steps=100, minutes=1.0, cosine=True, lr=1e-3)
    assert learning_rate(10, cosine, trained_s=30.0) == pytest.approx(5e-4)  # half the budget: half the lr
    assert learning_rate(50, cosine, trained_s=6.0) == pytest.approx(5e-4)  # half the steps
    assert learning_rate(10, PretrainConfig(steps=100, cosine=True, lr=1e-3), 30.0) > 9e-4  # no budget


def test_the_queue_keeps_the_last_projections_of_the_global_batch_first_in_first_out():
    queue = ProjectionQueue(5, 2, 3, torch.device("cpu"))
    for step in range(3):  # 3 pushes of 2 views: the first view pushed is gone, then the second
        z = torch.full((2, 2), float(step))
        queue.push(z, torch.tensor([10 * step, 10 * step + 1]), torch.ones(2, 3) * step)
    assert queue.filled == 5 and sorted(queue.tracks.tolist()) == [1, 10, 11, 20, 21]
    cfg = PretrainConfig(width=0.0625, steps=3, batch_size=4, p_pitch=0.0, log_every=1, queue=6)
    model, optimizer, augment = build(cfg, torch.device("cpu"))
    seen = []
    fit(model, optimizer, augment, fake_data(4, 4), cfg, torch.device("cpu"), 0, lambda *a: seen.append(a))
    assert len(seen) == 3 and all(np.isfinite(m["loss"]) for _, m, _ in seen)


def test_a_run_is_reproducible_from_its_seed():
    """Same seed, same weights, bit for bit (batches and every augmentation draw, pitch shift included, are
    seeded); another seed trains another model."""

    def train(seed: int, draws_before: int = 0) -> list[torch.Tensor]:
        augment_every_view = {"p_chain": 1.0, "p_filter": 1.0, "p_pitch": 0.5}
        cfg = PretrainConfig(
            width=0.0625, steps=2, batch_size=4, seed=seed, log_every=2, **augment_every_view
        )
        model, optimizer, augment = build(cfg, torch.device("cpu"))
        torch.rand(draws_before), random.random()  # draws before fit must not matter
        fit(model, optimizer, augment, fake_data(6, 6), cfg, torch.device("cpu"))
        return list(model.state_dict().values())

    first, again, other = train(0), train(0, draws_before=5), train(1)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))


def test_resume_conflicts_name_each_changed_field_with_both_values():
    saved = PretrainConfig().as_dict()
    changed = PretrainConfig(
        lr=1e-3, p_s=0.5, steps=20000, log_every=5, prefetch=8, min_workers=1, root="s3://b/moved"
    )
    assert resume_conflicts(saved, changed) == [
        "--lr: 0.0001 in the checkpoint, 0.001 now",
        "--p-s: 1.0 in the checkpoint, 0.5 now",
    ]
    assert resume_conflicts(saved, PretrainConfig(num_workers=4, gain_db=(-3.0, 3.0))) == [
        "--gain-db: [-15.0, 5.0] in the checkpoint, [-3.0, 3.0] now",
        "--num-workers: 2 in the checkpoint, 4 now",
    ]
    older = {k: v for k, v in saved.items() if k != "sync_bn"}  # a checkpoint from before the field
    assert resume_conflicts(older, PretrainConfig()) == [
        "--sync-bn: not recorded in the checkpoint, True now"
    ]


def test_check_resume_reads_the_newest_checkpoint_of_the_run(tmp_path):
    run = str(tmp_path / "runs" / "pretrain")
    check_resume(PretrainConfig(lr=1.0), run)  # no checkpoint yet: any config starts the run
    cfg = PretrainConfig(width=0.0625)
    model, optimizer, _ = build(cfg, torch.device("cpu"))
    for name, saved in [
        ("checkpoint_2024-01-01_00-00-00.000000", PretrainConfig(width=0.0625, lr=1.0)),
        ("checkpoint_2024-01-02_00-00-00.000000", cfg),
    ]:
        save_checkpoint(checkpoint_state(model, optimizer, 2, saved), storage.join(run, name))
    check_resume(PretrainConfig(width=0.0625, steps=20000, log_every=1), run)
    with pytest.raises(ConfigError, match=r"--lr: 0.0001 in the checkpoint, 0.01 now") as err:
        check_resume(PretrainConfig(width=0.0625, lr=1e-2), run)
    assert "--steps" in str(err.value).splitlines()[-1]  # the message says what may change


def test_resume_compares_the_device_once_it_is_chosen():
    saved = PretrainConfig(device="cpu").as_dict()
    assert resume_conflicts(saved, PretrainConfig(device="auto")) == []  # before the job has chosen
    assert resume_conflicts(saved, PretrainConfig(device="cpu")) == []
    assert resume_conflicts(saved, PretrainConfig(device="gpu")) == [
        "--device: 'cpu' in the checkpoint, 'gpu' now"
    ]


# --------------------------------------------------------------------------- the Ray job


@pytest.mark.slow
def test_two_worker_run_checkpoints_and_resumes_at_the_saved_step(tiny_catalog, tmp_path):
    import ray

    root = str(tmp_path)
    argv = ["--root", root, "--width", "0.0625", "--num-workers", "2", "--batch-size", "4"]
    argv += ["--checkpoint-every", "2", "--log-every", "1", "--p-pitch", "0", "--shard-tracks", "2"]
    ray.init(address="local", num_cpus=4, include_dashboard=False)
    try:
        layout = Layout(root)
        job.prepare_shards(parse(PretrainConfig, argv), layout)
        first = job.train(parse(PretrainConfig, [*argv, "--steps", "2", "--device", "cpu"]), layout)
        assert first.metrics["step"] == 2 and first.metrics["start_step"] == 0
        assert load_checkpoint(first.checkpoint.path)["step"] == 2
        with pytest.raises(ConfigError, match=r"--lr: 0.0001 in the checkpoint, 0.001 now"):
            job.main([*argv, "--steps", "4", "--lr", "1e-3"])
        # the same run name with more steps (and another log interval) resumes from step 2
        model_id = job.main([*argv, "--steps", "4", "--log-every", "2"])
    finally:
        ray.shutdown()
    card = storage.read_json(storage.join(layout.models, model_id, "card.json"))
    assert card["steps"] == 4 and card["metrics"]["start_step"] == 2
    assert card["data"]["usable"] == 4 and card["data"]["bad"] == {"missing": 1, "silent": 1}
    assert card["labels"]["labeled_tracks_used"] == 3
    assert versions.latest_version(layout.models) == model_id


def test_only_storage_failures_that_may_pass_restart_the_controller():
    """The pretrain job restarts a run whose controller failed on storage that may come back (the S3
    error Ray Train wraps, or one raised from it), and nothing else: a bug or a missing bucket still fails."""
    import ray.train

    from musiclib.core.ray_env import is_transient_storage_failure

    unreachable = OSError("When initiating multiple part upload: AWS Error NETWORK_CONNECTION during ...")
    assert is_transient_storage_failure(ray.train.ControllerError(unreachable))
    try:
        try:
            raise unreachable
        except OSError as exc:
            raise RuntimeError("could not write the snapshot") from exc
    except RuntimeError as exc:
        assert is_transient_storage_failure(ray.train.ControllerError(exc))
    assert is_transient_storage_failure(
        storage.TransientError(f"{storage.TRANSIENT}: s3://b/x: failed 4 times")
    )
    assert not is_transient_storage_failure(ray.train.ControllerError(ValueError("bad config")))
    assert not is_transient_storage_failure(ray.train.ControllerError(FileNotFoundError("bucket absent")))
