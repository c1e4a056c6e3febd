"""The LightningDataModules of the task recipes: GLUE, SQuAD, summarization and instruction data.

Nothing is imported here: ``import datamodules.glue`` loads what GLUE needs, not the other three.
"""
