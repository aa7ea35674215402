"""Operations: commands a person runs around the daemon.

client (talking to a running daemon), and one module per command body: collect, buffer,
status, logview (``specd logs``), install (``specd service``, launchd/systemd), models
(``specd models import-gguf``), train (``specd train`` and ``specd adapters``).
"""
