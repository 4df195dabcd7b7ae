"""Helpers every layer may use: the machine cache, child processes, dtype names."""
