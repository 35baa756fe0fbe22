"""moco_v3: being written (issue 14)."""
