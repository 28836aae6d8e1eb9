"""Using a trained model: metrics, calibration and OOD detection (``evaluator``), prediction on image
files and arrays (``infer``), posterior and file statistics (``inspection``) and figures (``plots``)."""
