"""quantplug adapters for Hugging Face transformers (BERT, OPT, GPT-Neo, LLaMA-style) and text data."""
