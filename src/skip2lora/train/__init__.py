"""Training: the one loop (loop.py), the one optimizer step (step.py), evaluation and checkpoints."""
