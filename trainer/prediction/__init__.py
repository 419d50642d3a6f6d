"""Using a trained model: the Python API (`api`: load_model, predict, evaluate) and a prediction job dropped into the
inbox with a ``predict.yaml`` (`drop`)."""
