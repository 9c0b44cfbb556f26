"""MLflow UI tests in a real browser (a package, so its conftest does not shadow tests/conftest.py)."""
