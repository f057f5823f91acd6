"""Labs for users' test suites: what the pytest plugin's fixtures (lab.pytest_plugin) are made
of, usable without pytest too (docs/testing.md)."""
