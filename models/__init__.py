"""Everything that turns pixels into predictions.

The network builder, the preprocessing shared by training and inference, the
model artifact (weights + manifest) and the predictor the node runs. This
package imports neither `pacs_node` nor `training`.
"""
