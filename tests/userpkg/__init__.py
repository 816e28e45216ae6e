"""A user's own package, as a cluster user would bring it: a model with BatchNorm and a dataset factory
over data hpcdistill never saw. It does not import hpcdistill; tests put its parent on PYTHONPATH."""
