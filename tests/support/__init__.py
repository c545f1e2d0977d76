"""Helpers the tests share: fixture paths, process drivers, fakes and builders (no tests)."""
