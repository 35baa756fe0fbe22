"""simsiam: being written (issue 14)."""
