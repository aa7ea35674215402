"""Adaptation: fine-tuning the draft on the target's outputs and putting it in service.

data (examples and batches), loss, lora (LoRA layers on the draft), trainer (the optimiser
loop), run (one training run), process (the ``python -m daemon.adaptation.process`` entry the
daemon spawns), loop (trigger, gate, hot swap). Never imports serving: the loop drives the
service through a protocol.
"""
