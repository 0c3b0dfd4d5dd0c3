"""tfgate's gateway: the secure, model-aware endpoint in front of the backend fleet, and the `tfgate` command."""
