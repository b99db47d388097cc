"""visprune.trainer: recipes, data, the Trainer, export and the `visprune` command line."""
