"""Store: what specd keeps on disk between runs.

The replay buffer, one SQLite file: buffer (the reader, its statistics and export), record (a
buffer record and its split and failure rules), codec (a record as one row), schema (the file,
its migrations and counts table, refusing files that are not ours), writer (the serving side's
writer thread and its retry). adapters (the adapter file format and the numbered version
store), runs (a training run's result and progress files, the contract between the training
process, the loop, the CLI and /status). Imports base and core only.
"""
