"""What every tandem process shares, torch-free: sampling parameters, per-step outputs (finish
reasons, logprobs), KV events and block hashing, a worker's load.

Nothing here imports torch, the engine or any I/O library: the router and the planner import
these modules and stay light (an import-linter contract in ``pyproject.toml`` keeps it so).
The wire forms of these types are the messages in ``proto/``; ``runtime.convert`` converts.
"""
