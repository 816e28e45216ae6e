"""tinyresnet: an example of a user's own model and dataset package, trained by hpcdistill.

It does not import hpcdistill: hpcdistill imports it, by the names given in

    HPCDISTILL_MODEL=tinyresnet.models:resnet      HPCDISTILL_MODEL_ARGS='{"width": 16}'
    HPCDISTILL_DATASET=tinyresnet.data:digits      HPCDISTILL_DATASET_ARGS='{"noise": 0.05}'

with the directory that holds this package on PYTHONPATH (see examples/README.md).
"""

from .data import digits
from .models import resnet

__all__ = ["digits", "resnet"]
