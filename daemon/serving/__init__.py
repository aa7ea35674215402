"""Serving: requests in, tokens out, records to the buffer.

worker (the one thread that owns the MLX models), service (models + engine + worker + buffer
writer), api (the OpenAI-compatible HTTP app), metrics (Prometheus), reload (live config),
notify (sd_notify). Never imports adaptation: the admin routes use a small protocol.
"""
