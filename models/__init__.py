"""Everything that turns pixels into predictions.

The network builder, the preprocessing shared by training and inference, the
model artifact (weights + manifest) and the predictor the node runs. This
package imports neither `pacs_node` nor `training`.
"""

import os

# ONNX Runtime's official builds send usage telemetry to Microsoft by default, on
# Linux too since 1.29: a device id and queued events under
# $XDG_CACHE_HOME/Microsoft/DeveloperTools/.onnxruntime, uploaded once the host can
# reach Microsoft. A hospital node sends nothing but to its configured destinations.
# ONNX Runtime reads this when it starts: set before any module here imports it, and
# inherited by the processes this one starts (the ONNX export, the infer processes).
os.environ["ORT_DISABLE_TELEMETRY"] = "1"
