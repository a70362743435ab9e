"""The agent: one per GPU host; inventories GPUs and runs cells in per-session sandboxes."""
