"""Sources of cluster state: they only record objects into fabric.tracker.Store (file, Kubernetes)."""
