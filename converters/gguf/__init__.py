"""GGUF: block quantizers (and, later, the architecture map, tokenizer vocab and writer)."""
