"""nemo-loop: looped language models on megatron-core, trained with LLOPSD."""

from nemo_loop.utils.console import quiet_known_third_party_noise

__version__ = "0.1.0"

# Before anything imports megatron-core, which announces its fallbacks at import time.
quiet_known_third_party_noise()
