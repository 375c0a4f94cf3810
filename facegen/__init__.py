"""facegen: synthetic-face sources through realism transforms into sharded Hugging Face datasets."""

__version__ = "0.1.0"
