"""The case names of tests/tf_keras_replay.py, importable without TensorFlow."""

DENSE_CASES = ['adam', 'adam-amsgrad-clipnorm', 'adam-adaptive-eps', 'adam-global-ema', 'adamw-exclude', 'adamw-schedule', 'adamw-clipvalue', 'adamax', 'adamax-decay-clip', 'adamax-exponential']
SPARSE_CASES = ["adam", "adam-amsgrad-clipnorm", "adam-global-ema", "adamw-exclude", "adamw-clipvalue", "adamax",
                "adamax-decay-clip"]
