"""Nets for the ONNX export tests: every layer type the exporter maps, in the geometries that are easy to
get wrong (pooling windows that overhang, padded averages, crops with offsets, in-place chains)."""
import numpy as np

from nets import gaussian_weights

OPS = """
name: "ops"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 24 dim: 22 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1" convolution_param { num_output: 8 kernel_size: 3 pad: 1 } }
layer { name: "leaky" type: "ReLU" bottom: "conv1" top: "conv1" relu_param { negative_slope: 0.1 } }
layer { name: "pool_max" type: "Pooling" bottom: "conv1" top: "pool_max" pooling_param { pool: MAX kernel_size: 3 stride: 2 } }
layer { name: "pool_ave" type: "Pooling" bottom: "conv1" top: "pool_ave" pooling_param { pool: AVE kernel_size: 3 stride: 2 pad: 1 } }
layer { name: "pool_ave0" type: "Pooling" bottom: "conv1" top: "pool_ave0" pooling_param { pool: AVE kernel_size: 3 stride: 2 } }
layer { name: "lrn" type: "LRN" bottom: "pool_max" top: "lrn" lrn_param { local_size: 3 alpha: 0.1 beta: 0.75 k: 2 } }
layer { name: "sig" type: "Sigmoid" bottom: "lrn" top: "sig" }
layer { name: "crop" type: "Crop" bottom: "pool_ave" bottom: "pool_max" top: "crop" crop_param { axis: 2 offset: 1 } }
layer { name: "prod" type: "Eltwise" bottom: "sig" bottom: "crop" top: "prod" eltwise_param { operation: PROD } }
layer { name: "tanh" type: "TanH" bottom: "pool_ave0" top: "tanh" }
layer { name: "max" type: "Eltwise" bottom: "prod" bottom: "tanh" top: "max" eltwise_param { operation: MAX } }
layer { name: "wsum" type: "Eltwise" bottom: "max" bottom: "prod" top: "wsum" eltwise_param { operation: SUM coeff: 0.5 coeff: -1 } }
layer { name: "abs" type: "AbsVal" bottom: "wsum" top: "abs" }
layer { name: "power" type: "Power" bottom: "abs" top: "power" power_param { power: 2 scale: 0.5 shift: 1 } }
layer { name: "log" type: "Log" bottom: "power" top: "log" log_param { shift: 1 } }
layer { name: "exp" type: "Exp" bottom: "log" top: "exp" exp_param { base: 2 scale: 0.1 } }
layer { name: "elu" type: "ELU" bottom: "wsum" top: "elu" elu_param { alpha: 0.5 } }
layer { name: "split" type: "Split" bottom: "elu" top: "e1" top: "e2" }
layer { name: "drop" type: "Dropout" bottom: "e1" top: "e1" dropout_param { dropout_ratio: 0.5 } }
layer { name: "affine" type: "Scale" bottom: "e2" top: "biased" scale_param { bias_term: true } }
layer { name: "gap" type: "Pooling" bottom: "exp" top: "gap" pooling_param { pool: AVE global_pooling: true } }
layer { name: "gap_flat" type: "Flatten" bottom: "gap" top: "gap_flat" }
layer { name: "gate" type: "Scale" bottom: "biased" bottom: "gap_flat" top: "gated" scale_param { axis: 0 } }
layer { name: "slice" type: "Slice" bottom: "gated" top: "s1" top: "s2" top: "s3" slice_param { axis: 1 slice_point: 3 slice_point: 5 } }
layer { name: "cat" type: "Concat" bottom: "s3" bottom: "s1" bottom: "e1" top: "cat" }
layer { name: "norm" type: "Normalize" bottom: "cat" top: "norm" norm_param { across_spatial: true channel_shared: true } }
layer { name: "up" type: "Deconvolution" bottom: "norm" top: "up" convolution_param { num_output: 4 kernel_size: 4 stride: 2 pad: 1 group: 2 } }
layer { name: "resh" type: "Reshape" bottom: "s2" top: "resh" reshape_param { shape { dim: 0 dim: -1 } } }
layer { name: "fc" type: "InnerProduct" bottom: "resh" top: "fc" inner_product_param { num_output: 5 } }
layer { name: "prob" type: "Softmax" bottom: "fc" top: "prob" }
"""


def ops_weights():
    r = gaussian_weights(11)
    return {
        "conv1": [r(8, 3, 3, 3), r(8)],
        "affine": [r(8), r(8)],
        "norm": [np.full(1, 3.0, np.float32)],
        "up": [r(14, 2, 4, 4), r(4)],
        "fc": [r(5, 2 * 12 * 11), r(5)],
    }


OPS_OUTPUTS = ["prob", "up", "power"]
