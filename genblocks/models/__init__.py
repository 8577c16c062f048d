"""The model families, each one file that reads top to bottom."""
