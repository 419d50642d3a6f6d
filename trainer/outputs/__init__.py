"""What a run leaves in its output folder: plots and files (`artifacts`, `results`), the report (`report`,
`report_page`), and the checked exports (`exports`, run without TensorFlow by `export_run`)."""
