"""Training for the node's models: data, the training loop, evaluation, export.

`pacs-train` (see `training.cli`) is the entry point. This package imports
`models` (the network, the shared preprocessing, the artifact format) and
never `pacs_node`.
"""
