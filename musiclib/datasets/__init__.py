"""Generated data, in one place (as scikit-learn keeps ``datasets``): nothing is downloaded at run time.

- ``demo``: the demo catalog, synthesised music with audible tags and few labels (``make demo``).
- ``audio_files``: samples encoded as WAV, FLAC, Ogg Vorbis, Opus, MP3 or AAC files.
- ``tagged_embeddings``: a catalog and embeddings correlated with its tags, for the tune and tag jobs.
- ``clustered_vectors``: unit vectors from a mixture of clusters, for nearest-neighbour tests and benchmarks.
- ``rendered``: the benchmark corpus, scores from the installed music21 rendered with FluidSynth.
- ``soundtracks``: the benchmark's real recordings, Debian game soundtracks with one tag each.
- ``system_packages``: the Debian packages those two need, installed with apt or named with the command.
"""
