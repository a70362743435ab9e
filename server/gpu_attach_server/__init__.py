"""jupyter-gpu-attach's server side: the broker (one per site) and the agent (one per GPU host)."""

__version__ = "0.1.0"
