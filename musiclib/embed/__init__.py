"""The embeddings stage: every catalog track through an exported encoder, averaged per track.

``embedder`` (decode, encode, average; the version a run writes), ``table`` (the embeddings table the
later stages read: schema, dataset, reads, usable rows as a matrix; no torch) and ``logmel`` (the log-mel
statistics, the hand-made floor every learned encoder is compared with).
"""
