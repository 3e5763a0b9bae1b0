"""Evaluation: batteries, the resumable runner, reports, bench, peak RSS and replay of golden cases."""
