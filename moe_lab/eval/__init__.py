"""Scoring models: per-group loss and bits per byte, token scoring, few-shot tasks, generation and
the kNN-LM."""
