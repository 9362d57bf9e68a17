"""Generated data, in one place (as scikit-learn keeps ``datasets``): nothing here is read from outside.

- ``demo``: the demo catalog, synthesised music with audible tags and few labels (``make demo``).
"""
