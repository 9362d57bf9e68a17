"""The encoder study, beside the data path: every encoder compared on one labeled catalog (job ``study``)."""
