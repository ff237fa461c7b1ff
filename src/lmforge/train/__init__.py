"""The one training loop and its parts: optimizer/schedule, batches, precision, checkpoints, distributed."""
