"""`dihal plan`: per-device memory and step-time estimates of a config on a topology (plan.py),
checked by compiling its programs ahead of time (aot.py). Above the model code: it builds the
real backbone and bridge abstractly."""
