"""moco_v2: being written (issue 14)."""
