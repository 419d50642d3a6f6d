"""The data subsystem: finding images (`scan`, `images`), splitting and auditing a dataset (`dataset`, `audit`), the
``tf.data`` input pipeline (`pipeline`), and generated demo datasets (`demo`)."""
