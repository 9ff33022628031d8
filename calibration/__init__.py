"""onnxcc calibration (arrives with its issue)."""
