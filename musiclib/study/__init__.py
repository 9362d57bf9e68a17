"""The encoder study, beside the data path: every encoder compared on one labeled catalog (job ``study``).

``study`` (its config, encoders, results, report and plot; ``python -m musiclib.study.study study-runs``
compares the runs of a root, ``study-plot`` copies a run's figure).
"""
