"""Evaluations that need radiograph studies: cross-view retrieval and the comparison suite."""
