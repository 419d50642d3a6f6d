"""Training: `train.train_cnn` and its steps, the time budget (`budget`), the Keras callbacks, the hardware settings,
and calibration fitted after training."""
