"""Engine: the Lightning training module, fit/predict, cascades, the run path and training figures."""
