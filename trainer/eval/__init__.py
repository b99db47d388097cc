"""visprune.trainer.eval: scoring model folders (`visprune eval`, `compare`, `bench`, the lmms-eval plugin).

loading (model folders and their plan's cost), prompts (PromptEncoder), timing (PrefillTimer), scoring (answer
metrics), teacher_forced and generation (the two ways of scoring), folder (`evaluate_dir`), compare, bench_setup and
bench, lmms_requests and lmms_plugin. Nothing is imported here, so `scoring` stays a light import for the CLI.
"""
