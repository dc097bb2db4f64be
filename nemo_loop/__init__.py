"""nemo-loop: looped language models on megatron-core, trained with LLOPSD."""

__version__ = "0.1.0"
