"""dropfit's daemon: watch the inbox, queue jobs durably, run the trainer, fill the outbox, serve metrics.

It never imports TensorFlow; it talks to the trainer through ``python -m trainer run`` and its JSON-lines events.
"""
