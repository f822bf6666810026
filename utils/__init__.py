"""Models and data: family adapters, calibration text, the layer-by-layer driver, checkpoints."""
