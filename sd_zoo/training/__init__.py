"""Training: the trainer and its wall-clock budgets."""
