"""The contract between dropfit's two processes, imported by both and free of TensorFlow by construction (standard
library, pydantic and PyYAML only; a test keeps it so):

- `contract.spec`, `contract.predict_spec`: ``job.yaml`` and ``predict.yaml`` — the schema, validation with located
  errors, defaults, the resolved spec;
- `contract.options`: `TrainOptions`, every training setting at once (what a resolved spec becomes);
- `contract.protocol`: the trainer's command line, exit codes, error kinds and the events it writes;
- `contract.files`: the name of every file the two exchange through the outbox and the state folder;
- `contract.atomic`, `contract.duration`: atomic file writes, durations as people write them.
"""
