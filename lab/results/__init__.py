"""What a run leaves: metrics from kernel counters and client timings, kernel time series, the
byte ledger, the emulation-health verdict and the report."""
