"""A lab's configuration: the YAML models and their validation (models), the cluster spec built
from them once (cluster; every other view of the topology derives from it: topology), and the
scaling knobs (scaling)."""
