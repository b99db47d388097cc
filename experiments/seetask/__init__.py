"""visprune.experiments.seetask: the see-task accuracy-vs-FLOPs experiment (`visprune demo`).

`demo` runs it, `base_model` trains its dense base, `baselines` builds the methods it compares against;
the data generator is `visprune.data_prep.seetask`, the two training recipes ship in `recipes/`.
"""
