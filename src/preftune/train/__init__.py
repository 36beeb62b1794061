"""Training: one loop (`loop.py`) and one file per method saying how a batch becomes a loss."""
