"""musiclib: tag a music catalog with few labels (SemiSupCon pretraining, embeddings, few-shot probes).

The data path, and where each stage lives (the jobs in ``jobs/`` wire Ray around these modules):

    catalog      ->  audio       ->  model          ->  embeddings   ->  probes          ->  tags
    catalog.py       audio.py        models.py          embedder.py      fewshot.py          tags.py
                     shards.py       pretraining.py                      probes.py
                     augment.py      losses.py                           metrics.py
                                     gather.py                           report.py
                                                                         sweep.py

- ``catalog``: the catalog's schema, validation and tag vocabulary.
- ``audio``: the one decoder (PyAV): resampling, windows, chunks, the reasons a track is unusable.
- ``shards``: the train split decoded once into int16 shards for pretraining.
- ``augment``, ``losses``, ``gather``, ``pretraining``: the views' augmentations, the SemiSupCon loss,
  the cross-worker gather, and the config, batches, step, loop and checkpoints (job ``pretrain``).
- ``models``: the SampleCNN encoder, its export as a version of the models dataset, ``resolve``.
- ``embedder``: decode, encode and average per track, the version a run writes (resume, carry-over),
  the embeddings table and its reader (job ``embed``).
- ``fewshot``, ``probes``, ``metrics``, ``report``, ``sweep``: support sets, linear probes, AP and ROC-AUC,
  the budget report, and the sweep's config, grid and outputs (job ``tune``).
- ``tags``: the tag table, its config and a query tool (job ``tag``).

Shared by every stage: ``storage`` (local and S3 objects, atomic writes), ``versions`` (versioned
datasets on it: version ids, manifests, ``publish``, ``_latest``, leases), ``config``
(dataclass configs, ``--field value`` overrides, the ``Layout`` under one root), ``ray_env`` (how jobs
start or join Ray; the only Ray import outside ``jobs/``), and ``datasets`` (generated data: the demo
catalog, audio files in every format, embeddings that follow their tags).
"""

__version__ = "0.1.0"
