"""tfgate's backend: a TensorFlow-Serving-compatible model server (one process per GPU in a fleet)."""
