"""A run's results: metrics and kernel series from the samples, the byte ledger, the emulation
health and the verdict it gives the run's exit status, and the text/SVG report."""
