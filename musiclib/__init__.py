"""musiclib: tag a music catalog with few labels (SemiSupCon pretraining, embeddings, few-shot probes).

The data path, in order, and where each stage lives (the jobs in ``jobs/`` wire Ray around these
modules; a stage imports only the stages before it, ``tests/test_layout.py``):

    core         core/: storage, versions, config, progress, outputs, ray_env, iceberg, tracking (shared)
    catalog      catalog.py
    audio        audio.py, train/shards.py
    model        train/: labels, data, augment, losses, gather, models, pretraining
    embeddings   embed/: chunking, logmel, embedder, table, iceberg_table
    probes       probe/: fewshot, probes, metrics, report, sweep
    tags         tag/: tags, tag_table, suggest, index, neighbors
    study        study/: study (every encoder compared on one catalog, beside the path)

    and ``datasets/``, generated data beside the path (it may import any stage; none imports it), and
    ``cli.py``, the ``musiclib`` command above every stage (it runs the jobs; nothing imports it).

- ``catalog``: the catalog's schema, validation and tag vocabulary; its human labels by track and as a
  multi-hot matrix; confirmed labels written by compare-and-swap.
- ``audio``: the one decoder (PyAV): resampling, windows, chunks, the reasons a track is unusable.
- ``train.shards``: the train split decoded once into int16 shards for pretraining.
- ``train.labels``, ``train.data``: which labeled tracks keep their tags (``p_s``); a worker's share of
  the shards in memory and its batches of views.
- ``train.augment``, ``train.losses``, ``train.gather``, ``train.pretraining``: the views' augmentations,
  the SemiSupCon loss, the cross-worker gather, and the config, step, loop and checkpoints (job
  ``pretrain``).
- ``train.models``: the SampleCNN encoder, its export as a version of the models dataset, ``model_id_or_latest``.
- ``embed.chunking``: tracks decoded to int16 chunks, a module over every chunk, outputs averaged per
  track; ``embed.logmel``: the hand-crafted log-mel floor (each band's mean and std over a track);
  ``embed.embedder``: encode and average per track beside the floor's statistics, the version a run
  writes (resume, carry-over) (job ``embed``); ``embed.table``: the embeddings table the later stages
  read, as the learned embedding, the statistics or both (``fused``) (no torch).
- ``probe.fewshot``, ``probe.probes``, ``probe.metrics``, ``probe.report``, ``probe.sweep``: support sets,
  linear probes, AP and ROC-AUC, the budget report, and the sweep's config, grid and outputs (job ``tune``).
- ``tag.tags``, ``tag.tag_table``: the tag table's rows, its config and a query tool (job ``tag``); the
  Apache Iceberg table it is stored in (catalog, one snapshot per run, commits, DuckDB queries).
- ``tag.index``: the nearest-neighbour index (exact search, faiss IVF) and its safetensors file;
  ``tag.neighbors``: the index dataset (job ``index``), nearest tracks, a new tag seeded from a few examples.
- ``tag.suggest``: what to label next per tag: the probe's uncertainty, diverse batches (job ``suggest``).
- ``study.study``: the study's config, encoders, results table, report and plot, and its runs side by side
  (job ``study``; docs/STUDY.md).

``core``, shared by every stage: ``storage`` (local and S3 objects, atomic writes, failures that may
pass), ``versions`` (versioned datasets on it: version ids, manifests, ``publish``, ``_latest``, leases),
``config`` (dataclass configs, ``--field value`` overrides, the ``Layout`` under one root), ``ray_env``
(how jobs start or join Ray), ``progress`` (what a job prints: progress lines, Ray kept quiet, end-of-job
summaries), ``lifecycle`` (every job's start, summary and result) and ``outputs`` (what the query tools
print: where a root's outputs are, tables). ``datasets``:
the demo catalog, audio files in every format, embeddings that follow their tags, clustered vectors, the
benchmark corpora.
"""

__version__ = "0.1.0"
