"""Helpers shared by the test modules (importable because pyproject sets pythonpath = tests)."""
