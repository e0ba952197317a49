"""What a run reads: model specs and weights, data sets and batching."""
