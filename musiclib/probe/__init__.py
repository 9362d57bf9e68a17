"""The probes stage: few-shot linear probes on frozen embeddings, and what each label budget buys.

``fewshot`` (support sets of a budget, probe data, one configuration's rows), ``probes`` (logistic
regression, torch linear, centroids; the saved probe set), ``metrics`` (AP, ROC-AUC, thresholds),
``report`` (the budget report and curve) and ``sweep`` (the tune job's config, grid and outputs).
"""
