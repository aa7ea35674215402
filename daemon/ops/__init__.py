"""Operations: commands a person runs around the daemon.

client (talking to a running daemon), collect, install (launchd/systemd), logview, and the
bodies of the CLI's buffer, train, adapters and status commands.
"""
