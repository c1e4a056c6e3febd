"""Task recipes built on the method: GLUE classification/regression, extractive QA (SQuAD v1.1/v2.0),
summarization and instruction tuning, each as pure pieces (task registry, official metrics, post-processing, ROUGE)
beside the LightningModule that uses them (``*_module.py``).

Nothing is imported here: the DataModules import the registries (``adalora_pl.tasks.glue``,
``adalora_pl.tasks.squad``) without loading the LightningModules and the method behind them.
"""
