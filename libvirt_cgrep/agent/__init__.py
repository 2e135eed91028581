"""The agent: a long-running scheduler that keeps each protected group within its RPO."""
