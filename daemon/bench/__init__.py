"""Benchmarks: leaves, imported by nothing but the CLI.

speed (engine rows side by side), draft (layer-skip candidates), adapt (the whole loop before
and after), blas (BLAS probe), serve (HTTP load), train (one training run), buffer (the replay
buffer's counts as it grows); each module also holds its ``specd bench ...`` command body,
``run``. common: what they share for measuring; report: the table and JSON output.
"""
