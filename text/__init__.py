"""Text, torch-free: tokenizers and chat templates (from an HF directory or a GGUF file's
metadata), and incremental detokenization with stop strings. The router and the offline ``LLM``
turn tokens into text with it; workers are token-in/token-out."""
