"""Filters: stages that keep or remove the rows of the run (language check, label check, dedup)."""
