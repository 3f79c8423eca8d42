"""Text corpora -> tfds (array_record) -> grain token windows -> hidden-state streams."""
