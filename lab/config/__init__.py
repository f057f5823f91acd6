"""A lab's configuration: the YAML models and their validation (models), the cluster spec built
from them once (every other view of the topology derives from it), and the scaling knobs."""
