"""Training: the loop, a step's pieces and the answer-only loss, checkpoints, several processes,
and experiment trackers."""
