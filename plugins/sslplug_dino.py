"""dino: being written (issue 14)."""
