"""The one training loop, its objective (what the loss is) and evaluation."""
