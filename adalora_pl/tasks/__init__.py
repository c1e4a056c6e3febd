"""Task recipes built on the method: GLUE classification/regression, extractive QA (SQuAD v1.1/v2.0) and
summarization, each as pure pieces (task registry, official metrics, post-processing, ROUGE) beside the
LightningModule that uses them (``*_module.py``)."""
