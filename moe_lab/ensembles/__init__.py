"""The branch-train-merge world at inference: domain discovery (clustering), sequence routers,
expert ensembles and their scoring, merging experts into one model, sparse upcycling."""
