"""Experiment families (dense, MoE, C-BTM, X-ELM, IFC): how each trains to a budget, and what its
artefacts cost and load as."""
