"""visprune.experiments: self-contained experiments built on the library (their data, models and reports)."""
