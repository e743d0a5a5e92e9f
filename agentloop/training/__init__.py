"""Training the bundled demo model: synthetic tool-use conversations, a BPE tokenizer,
DiffusionGemma's block-diffusion objective, and an evaluation through the real agent loop."""
