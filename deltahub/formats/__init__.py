"""Manifest schema and versions; safetensors and Hugging Face checkpoint readers and writers."""
