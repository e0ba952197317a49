"""Training: set-up, the loop, the summary, signals, the loss, checkpoints and many processes."""
