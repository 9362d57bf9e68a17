"""The embeddings stage: every catalog track through an exported encoder, averaged per track.

``chunking`` (a track as int16 chunks: decoded, run through a module, averaged back), ``logmel`` (the
log-mel statistics, the hand-made floor every learned encoder is compared with and fused with),
``embedder`` (encode and average beside the statistics; the version a run writes) and ``table`` (the
embeddings table the later stages read: schema, dataset, reads, usable rows as a matrix in a
representation; no torch).
"""
