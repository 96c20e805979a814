"""REAVL tests (a package, so `from tests.conftest import ...` works under plain `pytest` and from any directory)."""
