"""musiclib: tag a music catalog with few labels (SemiSupCon pretraining, embeddings, few-shot probes).

The data path, and where each stage lives (the jobs in ``jobs/`` wire Ray around these modules):

    catalog      ->  audio       ->  model          ->  embeddings   ->  probes          ->  tags
    catalog.py       audio.py        models.py          embedder.py      fewshot.py          tags.py
                     shards.py       pretraining.py     logmel.py        probes.py           tag_table.py
                     augment.py      losses.py                           metrics.py          neighbors.py
                                     gather.py                           report.py           suggest.py
                                                                         sweep.py

    and beside the path, ``study.py``: every encoder compared on one catalog (job ``study``).

- ``catalog``: the catalog's schema, validation and tag vocabulary.
- ``audio``: the one decoder (PyAV): resampling, windows, chunks, the reasons a track is unusable.
- ``shards``: the train split decoded once into int16 shards for pretraining.
- ``augment``, ``losses``, ``gather``, ``pretraining``: the views' augmentations, the SemiSupCon loss,
  the cross-worker gather, and the config, batches, step, loop and checkpoints (job ``pretrain``).
- ``models``: the SampleCNN encoder, its export as a version of the models dataset, ``model_id_or_latest``.
- ``embedder``: decode, encode and average per track, the version a run writes (resume, carry-over),
  the embeddings table and its reader (job ``embed``).
- ``fewshot``, ``probes``, ``metrics``, ``report``, ``sweep``: support sets, linear probes, AP and ROC-AUC,
  the budget report, and the sweep's config, grid and outputs (job ``tune``).
- ``tags``, ``tag_table``: the tag table's rows, its config and a query tool (job ``tag``); the Apache
  Iceberg table it is stored in (catalog, one snapshot per run, commits, DuckDB queries).
- ``neighbors``: nearest tracks by cosine similarity (exact search, a faiss IVF index, job ``index``),
  a new tag seeded from a few examples, confirmed labels written into the catalog.
- ``suggest``: what to label next per tag: the probe's uncertainty, diverse batches (job ``suggest``).
- ``logmel``, ``study``: the hand-crafted log-mel floor as an encoder, and the study's config, encoders,
  results table, report and plot (job ``study``; docs/STUDY.md).

Shared by every stage: ``storage`` (local and S3 objects, atomic writes), ``versions`` (versioned
datasets on it: version ids, manifests, ``publish``, ``_latest``, leases), ``config``
(dataclass configs, ``--field value`` overrides, the ``Layout`` under one root), ``ray_env`` (how jobs
start or join Ray; the only Ray import outside ``jobs/``), ``progress`` (what a job prints: progress
lines, Ray kept quiet, end-of-job summaries), ``lifecycle`` (every job's start, summary and result), and ``datasets`` (generated data: the demo catalog, audio
files in every format, embeddings that follow their tags, clustered vectors, the benchmark corpora).
"""

__version__ = "0.1.0"
