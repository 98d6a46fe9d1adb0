"""What a run leaves on disk: checkpoints (safetensors + JSON, never pickle), strict weight
loading, and the metrics log."""
