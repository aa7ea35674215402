"""Core: the models and the speculative decoding engine, with no storage and no serving.

engine (rounds, statistics), sampling (logit processing, the verification rule), drafting
(proposals copied from the request or past outputs), policy (cost-aware choice of each round),
records (what a generation produced: stats, rejections, acceptance), models (loading a
target/draft pair), gguf (the importer), backend (CPU/Metal and BLAS), prompts (prompt files,
chat encoding, the prompt-text rule), evaluation (teacher-forced agreement). Imports only the
base modules.
"""
