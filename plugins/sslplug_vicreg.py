"""vicreg: being written (issue 14)."""
