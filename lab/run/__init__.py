"""Running a lab: bring-up on a backend, the runner (plan, play, summarize), the workload and its
driver, chaos scenarios and the control endpoint, selftest and calibration."""
