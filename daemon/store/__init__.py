"""Store: what specd keeps on disk between runs.

buffer (the SQLite replay buffer), adapters (the adapter file format and the numbered version
store), runs (a training run's result and progress files, the contract between the training
process, the loop, the CLI and /status). Imports base and core only.
"""
