"""The embeddings stage: every catalog track through an exported encoder, averaged per track.

``embedder`` (decode, encode, average; the version a run writes) and ``logmel`` (the log-mel
statistics, the hand-made floor every learned encoder is compared with).
"""
