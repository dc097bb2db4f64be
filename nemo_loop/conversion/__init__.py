"""Checkpoint conversion between nemo-loop and other formats: orchestration above the model
(``nemo_loop.models``) and dist checkpointing (``nemo_loop.checkpointing``)."""
