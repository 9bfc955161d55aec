"""Schema sync, blob conversion, legacy formats, phase filtering, weight matching."""
import logging
import time

import numpy as np
import pytest

from caffe_compress import io
from caffe_compress._proto import caffe_pb2 as pb
from caffe_compress.errors import ModelError
from nets import write_model


def test_generated_module_is_in_sync_with_proto():
    pytest.importorskip("grpc_tools")
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("gen_proto", Path(__file__).parent.parent / "tools" / "gen_proto.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    assert gen.in_sync(gen.TARGET.read_text(), gen.generate()), "run tools/gen_proto.py"
    # what it compares: the schema itself -- a changed field in the .proto's descriptor is caught
    committed = gen.TARGET.read_text()
    assert gen.serialized_descriptor(committed).startswith(b"\n\x11proto/caffe.proto\x12\x14caffe_compress.caffe")
    assert not gen.in_sync(committed.replace("\\tBlobShape", "\\tBlobShapf", 1), gen.generate())


def test_schema_superset_field_numbers():
    blob = pb.BlobProto.DESCRIPTOR.fields_by_name
    assert blob["raw_data_type"].number == 10 and blob["raw_data"].number == 12
    layer = pb.LayerParameter.DESCRIPTOR.fields_by_name
    assert layer["detection_output_param"].number == 147 and layer["permute_param"].number == 148
    assert layer["norm_param"].number == 149 and layer["prior_box_param"].number == 150
    assert layer["convolution_param"].number == 106 and layer["inner_product_param"].number == 117


def test_blob_round_trip_and_sources():
    a = np.random.default_rng(0).standard_normal((3, 4, 5)).astype(np.float32)
    assert np.array_equal(io.blob_to_array(io.array_to_blob(a)), a)
    legacy = pb.BlobProto(num=1, channels=1, height=3, width=2)
    legacy.double_data.extend([1, 2, 3, 4, 5, 6])
    assert io.blob_to_array(legacy).shape == (1, 1, 3, 2)
    half = pb.BlobProto(raw_data_type=pb.FLOAT16, raw_data=np.arange(6, dtype="<f2").tobytes())
    half.shape.dim.extend([2, 3])
    assert np.array_equal(io.blob_to_array(half), np.arange(6, dtype=np.float32).reshape(2, 3))
    bad = pb.BlobProto()
    bad.shape.dim.extend([2, 3])
    bad.data.extend([1.0] * 5)
    with pytest.raises(ModelError, match="needs 6 values but 5"):
        io.blob_to_array(bad)


def test_big_blob_is_fast():
    a = np.random.default_rng(0).standard_normal((512, 18816)).astype(np.float32)
    blob = io.array_to_blob(a)
    start = time.perf_counter()
    back = io.blob_to_array(blob)
    assert time.perf_counter() - start < 1.0
    assert np.array_equal(back, a)


V0 = """
name: "v0"
input: "data"
input_dim: 1 input_dim: 2 input_dim: 6 input_dim: 6
layers { layer { name: "conv" type: "conv" num_output: 3 kernelsize: 3 } bottom: "data" top: "conv" }
layers { layer { name: "relu" type: "relu" } bottom: "conv" top: "conv" }
"""


def test_v0_upgrade(tmp_path):
    deploy = tmp_path / "v0.prototxt"
    deploy.write_text(V0)
    msg = pb.NetParameter()
    layer = msg.layers.add()
    layer.layer.name = "conv"
    layer.layer.blobs.append(io.array_to_blob(np.ones((3, 2, 3, 3), np.float32)))
    layer.layer.blobs.append(io.array_to_blob(np.zeros(3, np.float32)))
    model = tmp_path / "v0.caffemodel"
    model.write_bytes(msg.SerializeToString())
    net = io.load(deploy, model)
    assert [l.type for l in net.layers] == ["Input", "Convolution", "ReLU"]
    assert net.layer("conv").params["convolution_param"]["kernel_size"] == [3]


def test_weights_matching(tmp_path, caplog):
    text = """
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 2 } } }
layer { name: "fc" type: "InnerProduct" bottom: "data" top: "fc" inner_product_param { num_output: 3 } }
"""
    deploy, model = write_model(tmp_path, "m", text, {"fc": [np.ones((3, 2), np.float32), np.zeros(3, np.float32)]},
                                extra_layers={"unused": [np.ones(2, np.float32)]})
    with caplog.at_level(logging.INFO):
        net = io.load(deploy, model)
    assert "ignoring weights of layer 'unused'" in caplog.text
    assert net.param_count == 9
    _, model2 = write_model(tmp_path, "m2", text, {"other": [np.ones((3, 2), np.float32)]})
    with pytest.raises(ModelError, match="no weights for layer 'fc'"):
        io.load(deploy, model2)


def test_both_layer_and_layers_rejected(tmp_path):
    text = 'layer { name: "a" type: "ReLU" } layers { name: "b" type: RELU }'
    deploy, model = write_model(tmp_path, "x", text, {"a": [np.ones(1, np.float32)]})
    with pytest.raises(ModelError, match="both 'layer' and legacy 'layers'"):
        io.load(deploy, model)


def test_deploy_text_is_text_formats_of_the_whole_net():
    """prototxt_bytes writes each layer's text once (cached per Layer): the bytes are text_format's of the
    whole NetParameter, nested and repeated fields, enums and a net name included, and stay so when a layer
    appears in several nets."""
    from google.protobuf import json_format, text_format

    from caffe_compress.net import Layer, Net

    conv = Layer("conv", "Convolution", ("data",), ("conv",), {
        "convolution_param": {"num_output": 4, "kernel_size": [3], "pad": [1], "weight_filler": {"type": "xavier"}},
        "param": [{"lr_mult": 1.0}, {"lr_mult": 2.0, "decay_mult": 0.0}]})
    layers = (Layer("data", "Input", (), ("data",), {"input_param": {"shape": [{"dim": [1, 3, 8, 8]}]}}), conv,
              Layer("pool", "Pooling", ("conv",), ("pool",), {"pooling_param": {"pool": "AVE", "global_pooling": True}}),
              Layer("prob", "Softmax", ("pool",), ("prob",)))
    for net in (Net("named", layers), Net("", layers), Net("other", layers[:2])):
        whole = pb.NetParameter(**({"name": net.name} if net.name else {}))
        for layer in net.layers:
            msg = whole.layer.add()
            json_format.ParseDict(dict(layer.params), msg)
            msg.name, msg.type = layer.name, layer.type
            msg.bottom.extend(layer.bottoms)
            msg.top.extend(layer.tops)
        assert io.prototxt_bytes(net) == text_format.MessageToString(whole).encode("utf-8")
