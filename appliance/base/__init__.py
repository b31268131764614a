"""The ground floor: value types, keys, the error root and safe file writes.

Imports nothing else of the project, so every layer above (wire, core, kernel,
agent, control, webui) may use it. tests/unit/test_layers.py keeps it so.
"""
