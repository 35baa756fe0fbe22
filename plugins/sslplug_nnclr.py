"""nnclr: being written (issue 14)."""
