"""swav: being written (issue 14)."""
