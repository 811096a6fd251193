"""The shells that move bytes: sources, targets, and the restore and save pipelines."""
