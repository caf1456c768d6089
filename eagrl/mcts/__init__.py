"""Stage 1's expert-guided trajectory search (no Lightning inside)."""
