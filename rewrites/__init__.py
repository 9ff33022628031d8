"""onnxcc rewrites (arrives with its issue)."""
