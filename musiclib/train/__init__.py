"""The model stage: the encoder, its pretraining (SemiSupCon) and the data pretraining reads.

``shards`` (the train split decoded once to int16), ``labels`` (which labeled tracks keep their tags),
``data`` (a worker's share of the shards in memory, batches of views), ``augment`` (the view
augmentations), ``losses`` (the SemiSupCon loss), ``gather`` (the all-gather across DDP workers),
``models`` (the encoders, the projection head, export and loading) and ``pretraining`` (config, step,
loop, checkpoints).
"""
