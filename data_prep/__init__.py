"""visprune.data_prep: converters, validators and the synthetic see-task generator (later issues)."""
